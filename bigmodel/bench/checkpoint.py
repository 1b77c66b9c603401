"""(g) Checkpoint save and load rates against this disk's raw write and read rates, measured in the same run."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

from bigmodel.bench.common import ROOT, Figure, interleaved, median, paired_ratio
from bigmodel.checkpoint.io import Purger, Writeback
from bigmodel.config import load_config

TINY = str(ROOT / "configs" / "tiny.yaml")
# Quick mode: one block per tower, contrastive only (a small checkpoint's time is set by its number of tensors).
QUICK_MODEL = [
    "--model.vision_layers=1", "--model.text_layers=1", "--model.fusion=none", "--model.fusion_layers=0",
    "--train.loss_weights.itm=0", "--train.loss_weights.mlm=0",
]  # fmt: skip
# Full mode: 8 + 8 blocks of width 256 and 2 fusion blocks (~15M parameters in 334 tensors of ~45 kB on average;
# ~180 MB with AdamW's moments).
FULL_MODEL = [
    "--model.vision_width=256", "--model.vision_heads=4", "--model.vision_mlp_dim=1024", "--model.vision_layers=8",
    "--model.text_width=256", "--model.text_heads=4", "--model.text_mlp_dim=1024", "--model.text_layers=8",
    "--model.fusion_layers=2",
]  # fmt: skip
# Full mode, second size: 4 + 4 blocks of width 1024, contrastive only (~101M parameters; weight matrices of 4-16 MB,
# as in real models; ~1.2 GB with AdamW's moments).
LARGE_MODEL = [
    "--model.vision_width=1024", "--model.vision_heads=16", "--model.vision_mlp_dim=4096", "--model.vision_layers=4",
    "--model.text_width=1024", "--model.text_heads=16", "--model.text_mlp_dim=4096", "--model.text_layers=4",
    "--model.embed_dim=256", "--model.fusion=none", "--model.fusion_layers=0",
    "--train.loss_weights.itm=0", "--train.loss_weights.mlm=0",
]  # fmt: skip


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in _files(path))


def _raw_write(path: Path, data: bytes, writeback: bool = False) -> None:
    """Write and fsync, as the checkpoint writer does. `writeback`: in 8 MiB pieces, having the kernel start writing
    each to the disk as the checkpoint writer does (bigmodel.checkpoint.io.Writeback), which overlaps the copy
    into the page cache with the disk's writing."""
    with open(path, "wb") as f:
        if writeback:
            view, started = memoryview(data), Writeback(f)
            for start in range(0, len(view), started.every):
                f.write(view[start : start + started.every])
                started.wrote()
        else:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _raw_read(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def evict(*paths: Path) -> None:
    """Drop the files under `paths` from the page cache (written back first), so the next read comes from the disk."""
    for file in (f for path in paths for f in _files(path)):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def checkpoint_times(model: list[str], repeats: int, warmup: int, directory: str | None) -> dict[str, object]:
    """Seconds of save and load of a one-process engine after one step (`model`: config overrides of tiny.yaml)
    beside writing (with fsync) and reading the same number of bytes as one plain file in the same folder.

    Keys: bytes, write ({raw, raw_writeback, save}: a plain write and one starting the writeback every 8 MiB), read
    ({raw, load}: both from the disk, the page cache dropped before each), verified_read ({raw, verify_load}:
    verify_checkpoint, then load_sharded checking the own shard as it reads it: what resuming does, from the disk)
    and cached_read ({raw, load}: both from the page cache, as the files were just written). Each interleaved.
    """
    from bigmodel.checkpoint.manifest import verify_checkpoint
    from bigmodel.checkpoint.sharded import load_sharded, save_sharded
    from bigmodel.data import build_train_loader
    from bigmodel.engines import build_engine
    from bigmodel.parallel.context import setup_parallel
    from bigmodel.train.loop import split_microbatches

    with tempfile.TemporaryDirectory(prefix="bigmodel-bench-ckpt-", dir=directory) as tmp:
        root = Path(tmp)
        cfg = load_config(TINY, [*model, f"--train.out_dir={tmp}", "--log.wandb=disabled"])
        engine = build_engine(cfg, setup_parallel(cfg))
        engine.train_step(split_microbatches(next(iter(build_train_loader(cfg, 0, 1))), 1))  # AdamW state exists
        checkpoint, raw = root / "ckpt", root / "raw.bin"
        purger = Purger()
        save_sharded(checkpoint, engine, {"step": 1})
        nbytes = _folder_bytes(checkpoint)
        data = os.urandom(nbytes)
        _raw_write(raw, data)

        def load(checked: list[str] | None = None) -> None:
            with contextlib.redirect_stderr(io.StringIO()):
                load_sharded(checkpoint, engine, checked or ())

        def verify_load() -> None:  # what a resume does: check the files, the own shard's checksum as it loads
            load(verify_checkpoint(checkpoint))

        def cold() -> None:
            evict(raw, checkpoint)

        times = {
            "bytes": nbytes,
            "write": interleaved(
                {
                    "raw": lambda: _raw_write(raw, data),
                    "raw_writeback": lambda: _raw_write(raw, data, writeback=True),
                    "save": lambda: save_sharded(checkpoint, engine, {"step": 1}, purger=purger),
                },
                repeats,
                warmup,
                before=purger.wait,  # the replaced checkpoint's deletion (background) lands on no timed call
            ),
            "read": interleaved({"raw": lambda: _raw_read(raw), "load": load}, repeats, warmup, before=cold),
            "verified_read": interleaved(
                {"raw": lambda: _raw_read(raw), "verify_load": verify_load}, repeats, 0, before=cold
            ),
            "cached_read": interleaved({"raw": lambda: _raw_read(raw), "load": load}, repeats, warmup),
        }
        purger.close()
        shutil.rmtree(checkpoint, ignore_errors=True)
    return times


def _rates(times: dict[str, object], part: str, candidate: str) -> dict[str, float]:
    """Rate ratio (the inverse of the time ratio, median of pairs) and both median rates of one interleaved part.
    Where the part timed the raw write both plainly and with early writeback, the faster is the baseline (the
    disk's best measured rate) and `ratio_per_baseline` has both."""
    runs = times[part]
    nbytes = times["bytes"]
    raws = [key for key in runs if key.startswith("raw")]
    baseline = min(raws, key=lambda key: median(runs[key]))
    rates = {
        "ratio": paired_ratio(runs[baseline], runs[candidate]),
        "baseline": baseline,
        "raw_bytes_per_s": nbytes / median(runs[baseline]),
        f"{candidate}_bytes_per_s": nbytes / median(runs[candidate]),
    }
    if len(raws) > 1:
        rates["ratio_per_baseline"] = {key: paired_ratio(runs[key], runs[candidate]) for key in raws}
    return rates


def checkpoint_rates(quick: bool = False, directory: str | None = None) -> list[Figure]:
    """Save (`save_sharded`: DCP shards, manifest, checksums) and load (`load_sharded` into the engine) rates over
    this disk's raw write (fsync) and raw read rates of the same byte count in the same folder, interleaved. The
    write baseline is the faster of a plain write and one that starts the writeback every 8 MiB, as the checkpoint
    writer does (`details.<size>.save.baseline`). The load figure reads from the disk on both sides (page cache
    dropped before each read); details add the page-cache read, the verified load (checksums first, as resuming
    does) and, in full mode, a ~100M-parameter model (`large`)."""
    sizes = {"quick": QUICK_MODEL} if quick else {"full": FULL_MODEL, "large": LARGE_MODEL}
    repeats, warmup = (1, 0) if quick else (7, 1)
    measured = {
        name: checkpoint_times(model, repeats if name != "large" else 5, warmup, directory)
        for name, model in sizes.items()
    }
    details = {
        name: {
            "bytes": times["bytes"],
            "save": _rates(times, "write", "save"),
            "load_from_disk": _rates(times, "read", "load"),
            "verify_and_load_from_disk": _rates(times, "verified_read", "verify_load"),
            "load_from_page_cache": _rates(times, "cached_read", "load"),
            "seconds": {part: times[part] for part in ("write", "read", "verified_read", "cached_read")},
        }
        for name, times in measured.items()
    }
    figures = []
    for name, detail, label in (
        ("save", "save", "write (fsync)"),
        ("load", "load_from_disk", "read (page cache dropped)"),
    ):
        rates = details["quick" if quick else "full"][detail]
        figures.append(
            Figure(
                name=f"checkpoint_{name}",
                title=f"checkpoint {name} rate / raw disk {label} rate (same bytes, same folder)",
                ratio=rates["ratio"],
                target=0.8,
                direction=">=",
                baseline={"label": f"raw {label}", "value": rates["raw_bytes_per_s"], "unit": "bytes/s"},
                candidate={"label": f"{name}_sharded", "value": rates[f"{name}_bytes_per_s"], "unit": "bytes/s"},
                command="bigmodel bench --only checkpoint",
                details=details,
            )
        )
    return figures
