"""A manifest that lacks fields is a one-line error naming the file and the field (not a KeyError), for every command
that reads one; a save and a load in one process say nothing about torch.distributed being uninitialized."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

from bigmodel.checkpoint.manifest import MANIFEST_FILE, read_manifest
from bigmodel.checkpoint.safe import silence_single_process_notice
from bigmodel.checkpoint.sharded import FORMAT, load_sharded, save_sharded
from bigmodel.cli.main import main as cli_main
from bigmodel.config import load_config
from bigmodel.engines import build_engine
from bigmodel.parallel.context import setup_parallel

TINY = "configs/tiny.yaml"
QUICK = ["--train.steps=1", "--train.warmup_steps=0", "--log.progress=false", "--log.wandb=disabled"]


def checkpoint_with(run: Path, manifest: dict) -> Path:
    folder = run / "checkpoints" / "step_00000002"
    folder.mkdir(parents=True)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def one_line_error(argv: list[str], capsys) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_read_manifest_names_the_file_and_the_missing_fields(tmp_path):
    folder = checkpoint_with(tmp_path, {"format": FORMAT, "step": 2})
    with pytest.raises(ValueError, match=rf"^{folder / MANIFEST_FILE} lacks 'files', 'extra'; the checkpoint is"):
        read_manifest(folder, "files", "extra")
    (folder / MANIFEST_FILE).write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{folder / MANIFEST_FILE} is not JSON"):
        read_manifest(folder)


@pytest.mark.parametrize(
    ("manifest", "missing"),
    [({"format": FORMAT, "step": 2}, "files"), ({"format": FORMAT, "step": 2, "files": {}}, "extra")],
)
def test_resume_from_an_incomplete_manifest_is_one_line(tmp_path, capsys, manifest, missing):
    folder = checkpoint_with(tmp_path / "old", manifest)
    argv = ["train", "--config", TINY, "--resume", str(folder), *QUICK, f"--train.out_dir={tmp_path / 'new'}"]
    line = one_line_error(argv, capsys)
    assert line.startswith(f"error: {folder / MANIFEST_FILE} lacks '{missing}'; the checkpoint is incomplete"), line


@pytest.mark.parametrize(
    ("manifest", "missing"),
    [
        ({"format": FORMAT, "step": 2}, "extra"),
        ({"format": FORMAT, "byteorder": sys.byteorder, "step": 2, "extra": {"config": {"parallel": {}}}}, "files"),
    ],
)
def test_reshard_of_an_incomplete_manifest_is_one_line(tmp_path, capsys, manifest, missing):
    folder = checkpoint_with(tmp_path / "run", manifest)
    line = one_line_error(["ckpt", "reshard", str(folder), str(tmp_path / "out"), "--tp", "2"], capsys)
    assert line.startswith(f"error: {folder / MANIFEST_FILE} lacks '{missing}'; the checkpoint is incomplete"), line


def test_a_single_process_save_and_load_warn_of_nothing(tmp_path):
    cfg = load_config(TINY, ["--log.wandb=disabled"])
    engine = build_engine(cfg, setup_parallel(cfg))
    # bigmodel silences torch's "assuming ... a single process" process-wide at import (an async save gives it from
    # DCP's writer thread, once any scoped filter has ended); pytest drops filters set while it collects, so the test
    # sets it again in front of its own "error".
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any other warning fails
        silence_single_process_notice()
        save_sharded(tmp_path / "ckpt", engine, {"step": 1})
        assert load_sharded(tmp_path / "ckpt", engine) == {"step": 1}
        save_sharded(tmp_path / "ckpt", engine, {"step": 2}, async_=True).wait()
        assert load_sharded(tmp_path / "ckpt", engine) == {"step": 2}
