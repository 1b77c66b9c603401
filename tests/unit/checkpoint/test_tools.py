"""Checkpoint tools against references: the engine's own loader (load_sharded) for the weights, transformers'
CLIPModel for the export, and a second checkpoint for the diff; plus the `bigmodel ckpt` front."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")  # the optional `hf` extra

from safetensors.torch import load_file
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from transformers import CLIPModel

from bigmodel.checkpoint.reshard import reshard_checkpoint, target_layout
from bigmodel.checkpoint.safe import OnceReadReader
from bigmodel.checkpoint.sharded import load_sharded
from bigmodel.checkpoint.tools import consolidate, diff_checkpoints, inspect_checkpoint
from bigmodel.cli import ckpt
from bigmodel.cli import main as cli_main
from bigmodel.config import load_config
from bigmodel.config.load import config_from_dict
from bigmodel.config.schema import ParallelConfig
from bigmodel.data import build_eval_loader
from bigmodel.engines.native import NativeEngine
from bigmodel.hf.convert import export_hf, import_hf
from bigmodel.parallel.context import setup_parallel
from bigmodel.train.loop import train

QUICK = ["--train.warmup_steps=0", "--log.progress=false", "--log.wandb=disabled", "--data.eval_size=16"]


def train_run(recipe: str, out: Path, *overrides: str) -> Path:
    """Train `recipe` for 2 steps into `out` (checkpoints at steps 1 and 2) and return the step-2 checkpoint."""
    overrides = ["--train.steps=2", "--checkpoint.every=1", *QUICK, f"--train.out_dir={out}", *overrides]
    return train(load_config(recipe, overrides)).checkpoint


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory) -> Path:
    return train_run("configs/tiny-clip.yaml", tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory) -> Path:
    return train_run("configs/tiny.yaml", tmp_path_factory.mktemp("tiny"))


def loaded_model(checkpoint: Path) -> torch.nn.Module:
    """The reference: the checkpoint's config and weights through the engine's own loader, in one process."""
    saved = json.loads((checkpoint / "manifest.json").read_text())["extra"]["config"]
    cfg = dataclasses.replace(config_from_dict(saved), parallel=ParallelConfig())
    engine = NativeEngine(cfg, setup_parallel(cfg))
    load_sharded(checkpoint, engine)
    return engine.model.eval()


def test_inspect_reads_step_sizes_and_checksums(clip_run: Path, tmp_path: Path) -> None:
    info = inspect_checkpoint(clip_run.parent.parent)  # a run directory resolves to its newest checkpoint
    model = loaded_model(clip_run)
    assert info["path"] == str(clip_run) and info["step"] == 2
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["model_bytes"] == 4 * info["parameters"]  # fp32
    assert info["objectives"] == ["contrastive"] and info["model"]["fusion"] == "none"
    assert info["checksums"] == "ok" and info["files"]["manifest.json"] > 0
    corrupt = shutil.copytree(clip_run, tmp_path / "step_00000002")
    shard = next(corrupt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "does not match its xxh3_128 checksum" in inspect_checkpoint(corrupt)["checksums"]


def test_hyper_parameters_are_one_item_per_parameter(clip_run: Path) -> None:
    """DCP stores every non-tensor item as a record of its own: the optimizer's hyper-parameters are packed into one
    item per parameter (records.pack_hyperparameters), not one per parameter and hyper-parameter (12x the items)."""
    metadata = OnceReadReader(clip_run).read_metadata().state_dict_metadata
    items = {key for key, meta in metadata.items() if isinstance(meta, BytesStorageMetadata)}
    names = {name for name, _ in loaded_model(clip_run).named_parameters()}
    assert {key for key in items if not key.startswith("scheduler.")} == {f"optim.param_groups.{n}" for n in names}


def test_consolidate_writes_the_loaded_weights(clip_run: Path, tmp_path: Path) -> None:
    out = consolidate(clip_run, tmp_path / "model.safetensors")
    written = load_file(out)
    expected = loaded_model(clip_run).state_dict()
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor, rtol=0, atol=0)  # a byte copy: exact
    saved = json.loads((clip_run / "manifest.json").read_text())["extra"]["config"]
    assert json.loads((tmp_path / "config.json").read_text()) == saved


def test_diff_reports_differences_and_missing_tensors(clip_run: Path, fused_run: Path) -> None:
    same = diff_checkpoints(clip_run, clip_run)
    assert same and all(row.ok and row.max_abs == 0 for row in same)
    step1 = clip_run.parent / "step_00000001"
    rows = {row.name: row for row in diff_checkpoints(step1, clip_run, tol=1e-6)}
    # One AdamW step at lr 1e-3 moves each trained weight by about 1e-3 (Adam's normalised update).
    assert rows["text.token_embedding.weight"].max_abs > 1e-4 and not rows["text.token_embedding.weight"].ok
    other = {row.status for row in diff_checkpoints(clip_run, fused_run)}
    assert {"only_in_b", "compared"} <= other


def bigmodel_embeddings(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(batch)
    return out["image_embeds"], out["text_embeds"]


def clip_embeddings(clip: CLIPModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = clip.eval()(
            pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
    return out.image_embeds, out.text_embeds


def test_export_hf_computes_the_same_embeddings(clip_run: Path, tmp_path: Path) -> None:
    out = export_hf(clip_run, tmp_path / "hf")
    clip = CLIPModel.from_pretrained(out)
    model = loaded_model(clip_run)
    cfg = config_from_dict(json.loads((clip_run / "manifest.json").read_text())["extra"]["config"])
    batch = next(iter(build_eval_loader(cfg, 16)))  # real captions: [BOS] tokens [EOS] [PAD]...
    # Same weights in fp32, different kernels (eager/sdpa attention, mask forms): a few ulps on unit-norm
    # embeddings (see tests/unit/hf/test_clip.py); a misplaced tensor or wrong pooled token moves them by > 1e-2.
    for ours, theirs in zip(bigmodel_embeddings(model, batch), clip_embeddings(clip, batch), strict=True):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fusion", ["cross", "merged"])
def test_export_hf_of_fused_models_loads_with_automodel(fusion: str, tmp_path: Path) -> None:
    from transformers import AutoModel

    import bigmodel.hf  # registers bigmodel_encoder with AutoConfig / AutoModel

    checkpoint = train_run("configs/tiny.yaml", tmp_path / "run", f"--model.fusion={fusion}")
    exported = AutoModel.from_pretrained(export_hf(checkpoint, tmp_path / "hf")).eval()
    assert isinstance(exported, bigmodel.hf.BigmodelModel)
    cfg = config_from_dict(json.loads((checkpoint / "manifest.json").read_text())["extra"]["config"])
    batch = next(iter(build_eval_loader(cfg, 16)))
    with torch.no_grad():
        ours = loaded_model(checkpoint)(batch)
        theirs = exported(
            **{k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels")}
        )
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():  # the same module code on the same weights: equal (the bound is 1e-5)
        torch.testing.assert_close(theirs[key], value, rtol=0, atol=1e-5, msg=key)


def test_reshard_keeps_every_tensor_and_records_the_layout(fused_run: Path, tmp_path: Path) -> None:
    out = reshard_checkpoint(fused_run, tmp_path / "tp2_dp2", target_layout(fused_run, tp=2, pp=1, dp=2, zero_stage=3))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 4 and manifest["layout"]["tp"] == 2 and manifest["layout"]["zero_stage"] == 3
    assert sorted(manifest["files"]) == [".metadata", *(f"__{r}_0.distcp" for r in range(4))]
    assert all(row.ok and row.max_abs == 0 for row in diff_checkpoints(fused_run, out))
    loaded, original = loaded_model(out).state_dict(), loaded_model(fused_run).state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in original.items())
    single = reshard_checkpoint(fused_run, tmp_path / "one.safetensors", "single")
    assert load_file(single).keys() == original.keys()


def test_reshard_refuses_layouts_the_model_cannot_take(fused_run: Path, tmp_path: Path, capsys) -> None:
    cases = {
        ("--tp", "3"): "parallel.tp=3 does not divide model.vision_heads=2",
        ("--pp", "9", "--parallel.pp_schedule=gpipe", "--parallel.microbatches=8"): "need at least as many Transformer",
    }
    for args, message in cases.items():
        assert cli_main.main(["ckpt", "reshard", str(fused_run), str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert cli_main.main(["ckpt", "reshard", str(fused_run), str(tmp_path / "y"), "--tp", "2", "--no-progress"]) == 0
    assert cli_main.main(["ckpt", "reshard", str(fused_run), str(tmp_path / "y"), "--tp", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    single = tmp_path / "single.safetensors"
    assert cli_main.main(["ckpt", "reshard", str(fused_run), str(single), "--to", "single", "--no-progress"]) == 0
    assert single.is_file()


def test_from_deepspeed_front_names_a_wrong_input(fused_run: Path, tmp_path: Path, capsys) -> None:
    assert cli_main.main(["ckpt", "from-deepspeed", str(fused_run), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a deepspeed-engine checkpoint" in err and err.count("\n") == 1


def test_export_import_round_trip_is_exact_and_resumable(clip_run: Path, tmp_path: Path) -> None:
    hf_dir = export_hf(clip_run, tmp_path / "hf")
    imported = import_hf(hf_dir, tmp_path / "imported")
    assert all(row.ok and row.max_abs == 0 for row in diff_checkpoints(clip_run, imported))  # safetensors is lossless
    with pytest.raises(ValueError, match="is not empty"):
        import_hf(hf_dir, tmp_path / "imported")
    # The imported run trains on from its step-0 checkpoint.
    resumed = load_config(
        tmp_path / "imported" / "config.yaml",
        ["--train.steps=1", *QUICK, f"--checkpoint.resume={imported}"],
    )
    assert train(resumed).checkpoint.name == "step_00000001"

    # A perturbed tensor shows up in the diff, and only that one.
    clip = CLIPModel.from_pretrained(hf_dir)
    with torch.no_grad():
        clip.text_projection.weight.add_(1e-3)
    clip.save_pretrained(tmp_path / "hf2")
    rows = diff_checkpoints(clip_run, import_hf(tmp_path / "hf2", tmp_path / "imported2"), tol=1e-6)
    assert [row.name for row in rows if not row.ok] == ["contrastive.text_projection.weight"]
    assert rows[0].max_abs == 0


def run_cli(argv: list[str], monkeypatch) -> int:
    assert ckpt in cli_main.COMMANDS
    return cli_main.main(argv)


def test_cli(clip_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    assert run_cli(["ckpt", "inspect", str(clip_run), "--json"], monkeypatch) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert run_cli(["ckpt", "diff", str(clip_run), str(clip_run)], monkeypatch) == 0
    step1 = str(clip_run.parent / "step_00000001")
    assert run_cli(["ckpt", "diff", step1, str(clip_run), "--tol", "1e-6"], monkeypatch) == 1
    assert run_cli(["ckpt", "diff", step1, str(clip_run), "--tol", "1"], monkeypatch) == 0
    capsys.readouterr()
    assert (
        run_cli(["ckpt", "consolidate", str(tmp_path / "nowhere"), str(tmp_path / "x.safetensors")], monkeypatch) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: no complete checkpoint at") and err.count("\n") == 1


def test_writers_checksum_their_own_files(tmp_path):
    # Each rank's writer hashes its file while writing and leaves the digest beside it; the manifest step takes
    # that digest (and removes the file) instead of reading the bytes back, and hashes what no writer left one for.
    import torch.distributed.checkpoint as dcp

    from bigmodel.checkpoint.manifest import CHECKSUM, DIGEST_SUFFIX, checksums, file_digest
    from bigmodel.checkpoint.sharded import RawRecordWriter

    state = {"weight": torch.randn(64, 32), "bias": torch.arange(7.0), "step": 3}
    dcp.save(state, storage_writer=RawRecordWriter(tmp_path))
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(DIGEST_SUFFIX))
    assert left == ["__0_0.distcp" + DIGEST_SUFFIX]
    sums = checksums(tmp_path)
    assert sorted(sums) == [".metadata", "__0_0.distcp"]
    assert not any(p.name.endswith(DIGEST_SUFFIX) for p in tmp_path.iterdir())
    for name, recorded in sums.items():
        assert recorded == f"{CHECKSUM}:{file_digest(tmp_path / name, CHECKSUM)}", name


def test_writeback_starts_every_few_mib_and_keeps_the_bytes(tmp_path, monkeypatch):
    # The writer has the kernel start writing each 8 MiB it wrote (sync_file_range, Linux) without waiting; the
    # file holds exactly what was written, and the ranges asked for cover it without gaps.
    import os

    from bigmodel.checkpoint import io

    asked: list[tuple[int, int]] = []
    real = io._SYNC_FILE_RANGE
    monkeypatch.setattr(
        io,
        "_SYNC_FILE_RANGE",
        lambda fd, start, n, flags: asked.append((start, n)) or (real(fd, start, n, flags) if real else 0),
    )
    data = os.urandom(3 * (1 << 20) + 5)
    with open(tmp_path / "f", "wb") as f:
        writeback = io.Writeback(f, every=1 << 20)
        for start in range(0, len(data), 100_000):
            f.write(data[start : start + 100_000])
            writeback.wrote()
    assert (tmp_path / "f").read_bytes() == data
    assert asked and asked[0][0] == 0 and all(n >= 1 << 20 for _, n in asked)
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(asked))
    assert len(data) - sum(n for _, n in asked) < 1 << 20  # the closing fsync writes the rest


def test_replaced_and_retired_checkpoints_are_deleted_in_the_background(tmp_path):
    # A folder handed to purge stops being a checkpoint at once (renamed to .purge_*) and is deleted by a thread;
    # what a killed process left behind is deleted by the next save in the same folder.
    from bigmodel.checkpoint.io import PURGE_PREFIX, Purger

    purger = Purger()
    old = tmp_path / "step_00000001"
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "shard").write_bytes(b"x" * 1000)
    purger.purge(old)
    assert not old.exists()
    purger.wait()
    assert list(tmp_path.iterdir()) == []

    left = tmp_path / f"{PURGE_PREFIX}step_00000002.dead"
    left.mkdir()
    (left / "shard").write_bytes(b"y")
    purger.purge_leftovers(tmp_path)
    purger.close()
    assert list(tmp_path.iterdir()) == []
    purger.purge(tmp_path / "missing")  # nothing to do


def test_a_save_while_the_last_deletion_runs_leaves_it_alone(tmp_path, monkeypatch):
    # The next save in the folder looks for leftovers while the checkpoint it replaced is still being deleted: that
    # folder is this process's own deletion and is neither renamed nor queued twice (renaming it under the deleting
    # thread made the save fail with FileNotFoundError).
    import shutil
    import threading

    from bigmodel.checkpoint import io

    deleting, release, deleted = threading.Event(), threading.Event(), []
    rmtree = shutil.rmtree

    def slow_rmtree(path, *args, **kwargs):
        deleting.set()
        release.wait(timeout=30)
        deleted.append(path)
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(io.shutil, "rmtree", slow_rmtree)
    old = tmp_path / "step_00000001"
    old.mkdir()
    (old / "shard").write_bytes(b"x")
    purger = io.Purger()
    purger.purge(old)
    assert deleting.wait(timeout=30)
    (trash,) = tmp_path.iterdir()
    purger.purge_leftovers(tmp_path)
    assert list(tmp_path.iterdir()) == [trash]  # not renamed under the deleting thread
    release.set()
    purger.close()
    assert list(tmp_path.iterdir()) == [] and deleted == [trash]
