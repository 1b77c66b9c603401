"""Finding the checkpoint to resume: complete checkpoints only, an interrupted save is skipped and named; a checkpoint
of another model is refused in one line, one written before a config field existed is not."""

import dataclasses
import json

import pytest

from bigmodel.checkpoint.run import check_same_locks, check_same_model, find_resume_checkpoint, resolve_checkpoint
from bigmodel.config.schema import ModelConfig, TrainConfig


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


def test_verification_shares_give_each_rank_its_own_shard():
    from bigmodel.checkpoint.manifest import verify_shares

    names = [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"]
    assert verify_shares(names, 4) == [
        ["__0_0.distcp", ".metadata"],
        ["__1_0.distcp"],
        ["__2_0.distcp"],
        ["__3_0.distcp"],
    ]
    two = verify_shares(names, 2)  # saved by 4, resumed on 2: the others' files in turn
    assert two == [["__0_0.distcp", ".metadata", "__3_0.distcp"], ["__1_0.distcp", "__2_0.distcp"]]
    assert verify_shares(names, 1) == [["__0_0.distcp", ".metadata", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"]]
    for world in (1, 2, 3, 4, 8):
        shares = verify_shares(names, world)
        assert sorted(n for share in shares for n in share) == sorted(names)


def test_a_share_is_checked_alone(tmp_path):
    from bigmodel.checkpoint.manifest import verify_manifest

    folder = tmp_path / "step_00000001"
    folder.mkdir()
    (folder / "a").write_bytes(b"a")
    (folder / "b").write_bytes(b"b")
    import xxhash

    files = {n: f"xxh3_128:{xxhash.xxh3_128(n.encode()).hexdigest()}" for n in ("a", "b")}
    (folder / "manifest.json").write_text(json.dumps({"files": files}))
    verify_manifest(folder)
    (folder / "b").write_bytes(b"changed")
    (folder / "c").write_bytes(b"unlisted")
    verify_manifest(folder, ["a"])  # b and c are other ranks' concern
    with pytest.raises(ValueError, match="c is not listed"):
        verify_manifest(folder, ["a"], unlisted=True)
    with pytest.raises(ValueError, match="b does not match"):
        verify_manifest(folder, ["b"])
    with pytest.raises(ValueError, match="d is not listed"):
        verify_manifest(folder, ["d"])


def saved_with(root, model: dict, **train):
    """A checkpoint folder whose manifest records `model` as its config's model section and `train` in its train
    section (what a trainer writes)."""
    folder = make(root, "step_00000002")
    config = {"model": model, "train": {"loss_weights": {"contrastive": 1.0, "itm": 0.0, "mlm": 0.0}, **train}}
    (folder / "manifest.json").write_text(json.dumps({"step": 2, "extra": {"config": config}}))
    return folder


def test_a_config_saved_before_a_field_existed_resumes_with_its_default(tmp_path):
    model = dataclasses.asdict(ModelConfig())
    older = {k: v for k, v in model.items() if k != "cpu_fused_kernels"}  # as checkpoints written before it exist
    check_same_model(saved_with(tmp_path, older), model, ("contrastive",))


def test_the_kernel_choice_is_not_a_different_model_but_the_width_is(tmp_path):
    model = dataclasses.asdict(ModelConfig())
    folder = saved_with(tmp_path, model)
    check_same_model(folder, model | {"cpu_fused_kernels": not model["cpu_fused_kernels"]}, ("contrastive",))
    with pytest.raises(ValueError, match=r"holds a different model: model.text_width=\d+ there, 48 here"):
        check_same_model(folder, model | {"text_width": 48}, ("contrastive",))
    with pytest.raises(ValueError, match="trained the heads"):
        check_same_model(folder, model, ("contrastive", "itm"))


def test_a_locked_checkpoint_resumes_only_as_locked_or_more(tmp_path):
    model = ModelConfig(fusion="none", fusion_layers=0)
    objectives = ("contrastive",)
    folder = saved_with(tmp_path, dataclasses.asdict(model), lock_image=True, unlocked_blocks=1)
    same = TrainConfig(lock_image=True, unlocked_blocks=1)
    check_same_locks(folder, model, objectives, same)
    # Freezing more than the saved run did needs nothing the checkpoint lacks.
    check_same_locks(folder, model, objectives, TrainConfig(lock_image=True, lock_text=True, unlocked_blocks=1))
    # Training a parameter that was frozen needs its optimizer state, which the checkpoint does not hold.
    for unlocked in (TrainConfig(), TrainConfig(lock_image=True, unlocked_blocks=2)):
        with pytest.raises(ValueError, match=r"train.lock_image=True .* no optimizer state for vision\."):
            check_same_locks(folder, model, objectives, unlocked)
    # A checkpoint saved before the lock fields existed was unlocked.
    check_same_locks(saved_with(tmp_path / "old", dataclasses.asdict(model)), model, objectives, TrainConfig())
