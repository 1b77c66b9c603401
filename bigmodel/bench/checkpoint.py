"""(g) Checkpoint save and load rates against this disk's raw write and read rates, measured in the same run."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

from bigmodel.bench.common import ROOT, Figure, interleaved, median, paired_ratio
from bigmodel.config import load_config

TINY = str(ROOT / "configs" / "tiny.yaml")
# Quick mode: one block per tower, contrastive only (DCP writes one record per tensor and hyper-parameter, so the
# number of tensors, not their bytes, sets a small checkpoint's time).
QUICK_MODEL = [
    "--model.vision_layers=1", "--model.text_layers=1", "--model.fusion=none", "--model.fusion_layers=0",
    "--train.loss_weights.itm=0", "--train.loss_weights.mlm=0",
]  # fmt: skip
# Full mode: 8 + 8 blocks of width 256 and 2 fusion blocks (~15M parameters; ~180 MB with AdamW's moments).
FULL_MODEL = [
    "--model.vision_width=256", "--model.vision_heads=4", "--model.vision_mlp_dim=1024", "--model.vision_layers=8",
    "--model.text_width=256", "--model.text_heads=4", "--model.text_mlp_dim=1024", "--model.text_layers=8",
    "--model.fusion_layers=2",
]  # fmt: skip


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _raw_write(path: Path, data: bytes) -> None:
    """Write and fsync, as DCP's writer does (sync_files=True)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _raw_read(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def checkpoint_rates(quick: bool = False, directory: str | None = None) -> list[Figure]:
    """Save (`save_sharded`: DCP shards, manifest, checksums) and load (`load_sharded` into the engine) of a
    one-process engine after one step, as bytes/s, over writing (with fsync) and reading the same number of bytes
    as one plain file in the same folder. Interleaved; reads of both come from the same page-cache state."""
    from bigmodel.checkpoint.sharded import load_sharded, save_sharded
    from bigmodel.data import build_train_loader
    from bigmodel.engines import build_engine
    from bigmodel.parallel.context import setup_parallel
    from bigmodel.train.loop import split_microbatches

    with tempfile.TemporaryDirectory(prefix="bigmodel-bench-ckpt-", dir=directory) as tmp:
        root = Path(tmp)
        cfg = load_config(
            TINY, [*(QUICK_MODEL if quick else FULL_MODEL), f"--train.out_dir={tmp}", "--log.wandb=disabled"]
        )
        ctx = setup_parallel(cfg)
        engine = build_engine(cfg, ctx)
        engine.train_step(split_microbatches(next(iter(build_train_loader(cfg, 0, 1))), 1))  # AdamW state exists
        checkpoint = root / "ckpt"
        save_sharded(checkpoint, engine, {"step": 1})
        nbytes = _folder_bytes(checkpoint)
        data = os.urandom(nbytes)
        raw = root / "raw.bin"

        def save() -> None:
            save_sharded(checkpoint, engine, {"step": 1})

        def load() -> None:
            with contextlib.redirect_stderr(io.StringIO()):
                load_sharded(checkpoint, engine)

        repeats, warmup = (1, 0) if quick else (7, 1)
        writes = interleaved({"raw": lambda: _raw_write(raw, data), "save": save}, repeats, warmup)
        reads = interleaved({"raw": lambda: _raw_read(raw), "load": load}, repeats, warmup)
        shutil.rmtree(checkpoint, ignore_errors=True)
    figures = []
    for name, times, key, label in (("save", writes, "save", "write"), ("load", reads, "load", "read")):
        figures.append(
            Figure(
                name=f"checkpoint_{name}",
                title=f"checkpoint {name} rate / raw disk {label} rate (same bytes, same folder)",
                ratio=paired_ratio(times["raw"], times[key]),  # rate ratio = inverse time ratio
                target=0.8,
                direction=">=",
                baseline={"label": f"raw {label}", "value": nbytes / median(times["raw"]), "unit": "bytes/s"},
                candidate={"label": f"{name}_sharded", "value": nbytes / median(times[key]), "unit": "bytes/s"},
                command="bigmodel bench --only checkpoint",
                details={"bytes": nbytes, "seconds": times},
            )
        )
    return figures
