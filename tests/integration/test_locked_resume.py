"""A locked run's checkpoint (train.lock_image: no optimizer state for the frozen tower) resumes and reshards like
any other: saved by 2 ZeRO-3 ranks, it resumes on one process, also after `bigmodel ckpt reshard`; saved by the
DeepSpeed engine, it resumes in its layout; resuming it with the tower unlocked is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigmodel.config import load_config
from bigmodel.train.loop import train
from tests.support.cli import bigmodel

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
COMMON = [
    "--train.lock_image=true",
    "--train.unlocked_blocks=1",
    "--train.steps=6",
    "--log.every=1",
    "--log.progress=false",
    "--log.wandb=disabled",
]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_locked_checkpoint_resumes_in_another_layout_and_after_reshard(tmp_path):
    layout = ["--parallel.dp_shard=2", "--parallel.zero_stage=3", "--checkpoint.every=3"]
    saved = bigmodel("launch", "--nproc", "2", "--config", TINY, *layout, *COMMON, f"--train.out_dir={tmp_path / 'z3'}")
    assert saved.returncode == 0, saved.stderr[-3000:]
    midway = tmp_path / "z3" / "checkpoints" / "step_00000003"
    reference = train(load_config(TINY, [*COMMON, f"--train.out_dir={tmp_path / 'ref'}"]))
    assert reference.final_loss < losses(tmp_path / "ref")[0]  # the unlocked part trains
    resumed = bigmodel("ckpt", "reshard", str(midway), str(tmp_path / "single"), "--dp", "1", "--zero-stage", "0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name, source in (("one", midway), ("resharded", tmp_path / "single")):
        train(load_config(TINY, [*COMMON, f"--checkpoint.resume={source}", f"--train.out_dir={tmp_path / name}"]))
        # Saved as ZeRO-3 shards over 2 ranks (the frozen tower's parameters without optimizer state), loaded whole
        # on one process: the last 3 steps follow the one-process run up to the summation order of the first 3
        # (~1e-7 relative); a frozen parameter that moved, or lost optimizer state, moves them by > 1e-3.
        assert losses(tmp_path / name) == pytest.approx(losses(tmp_path / "ref")[3:], rel=1e-5), name
    unlocked = [c for c in COMMON if not c.startswith(("--train.lock_image", "--train.unlocked_blocks"))]
    refused = bigmodel("train", "--config", TINY, *unlocked, f"--checkpoint.resume={midway}",
                       f"--train.out_dir={tmp_path / 'unlocked'}")  # fmt: skip
    assert refused.returncode != 0
    assert "holds no optimizer state for vision." in refused.stderr.splitlines()[-1], refused.stderr


@pytest.mark.slow
def test_locked_deepspeed_checkpoint_resumes_exactly(tmp_path):
    layout = ["--engine=deepspeed", "--parallel.dp_shard=2", "--parallel.zero_stage=2", "--checkpoint.every=3"]
    whole = bigmodel("launch", "--nproc", "2", "--config", TINY, *layout, *COMMON, f"--train.out_dir={tmp_path / 'a'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    midway = tmp_path / "a" / "checkpoints" / "step_00000003"
    resumed = bigmodel(
        "launch", "--nproc", "2", "--config", TINY, *layout, *COMMON, f"--checkpoint.resume={midway}",
        f"--train.out_dir={tmp_path / 'b'}",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Same layout, same engine: the resumed steps repeat the uninterrupted ones bit for bit.
    assert losses(tmp_path / "b") == losses(tmp_path / "a")[3:]
