"""Finding the checkpoint to resume: complete checkpoints only, an interrupted save is skipped and named."""

import json

import pytest

from bigmodel.checkpoint.run import find_resume_checkpoint, resolve_checkpoint


def make(root, name, complete=True):
    folder = root / "checkpoints" / name
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"shard")
    if complete:
        (folder / "manifest.json").write_text(json.dumps({"step": int(name.split("_")[-1])}))
    return folder


def test_auto_skips_an_incomplete_newer_save(tmp_path, capsys):
    make(tmp_path, "step_00000003")
    good = make(tmp_path, "step_00000006")
    make(tmp_path, ".tmp_step_00000009", complete=False)  # killed while saving: never renamed, no manifest
    assert find_resume_checkpoint("auto", tmp_path) == good
    assert "skipping incomplete checkpoint step_00000009" in capsys.readouterr().err


def test_auto_with_nothing_saved_yet_starts_fresh(tmp_path):
    assert find_resume_checkpoint("auto", tmp_path) is None


def test_paths_resolve_to_the_newest_complete_checkpoint(tmp_path):
    make(tmp_path, "step_00000003")
    newest = make(tmp_path, "step_00000006")
    assert resolve_checkpoint(tmp_path) == newest
    assert resolve_checkpoint(tmp_path / "checkpoints") == newest
    assert resolve_checkpoint(newest) == newest
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "nowhere")
