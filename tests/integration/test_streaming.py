"""Training in the streaming mode on shards served by a real S3 server on loopback (moto): one process with loader
workers and four data-parallel processes (`bigmodel launch`), each resumed from a checkpoint taken mid-run on the
uninterrupted trajectory bit for bit; resuming the four-rank checkpoint with one process announces a fresh shard
assignment in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigmodel.config import load_config
from bigmodel.data.shards import write_shapes_shards
from bigmodel.train.loop import train

pytestmark = pytest.mark.slow  # three in-process runs and two four-process jobs

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS = 6
# Deterministic kernels and dropout on (its draws are seeded per step): a resumed run equal to the uninterrupted one
# is bitwise, as long as the loader hands out exactly the batches the uninterrupted run got.
COMMON = [
    "--log.every=1",
    "--log.progress=false",
    "--log.wandb=disabled",
    "--data.source=shards",
    "--data.mode=auto",
    "--data.shuffle_buffer=6",
    f"--train.steps={STEPS}",
    "--train.deterministic=true",
    "--model.dropout=0.1",
]


@pytest.fixture(scope="module")
def bucket(s3_server, tmp_path_factory) -> str:
    """8 training shards of 8 shapes samples and one eval shard, uploaded; returns their s3:// prefix."""
    local = tmp_path_factory.mktemp("shards")
    write_shapes_shards(local, 64, 16, image_size=32, max_shapes=2, samples_per_shard=8)
    return s3_server.upload(local, s3_server.new_bucket(), "shapes")


def data_args(base: str) -> list[str]:
    return [f"--data.train_shards={base}/train-{{000000..000007}}.tar", f"--data.eval_shards={base}/eval-000000.tar"]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def launch(out: Path, *args: str) -> None:
    """`bigmodel launch --nproc 4` with four data-parallel ranks (the S3 server's AWS_* variables inherited)."""
    cmd = [sys.executable, "-m", "bigmodel.cli.main", "launch", "--nproc", "4", "--config", str(TINY)]
    job = subprocess.run(
        [*cmd, "--parallel.dp_shard=4", *COMMON, f"--train.out_dir={out}", *args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert job.returncode == 0, f"exit {job.returncode}:\n{job.stdout[-4000:]}"


def run_here(out: Path, *args: str) -> None:
    train(load_config(TINY, [*COMMON, f"--train.out_dir={out}", *args]))


def test_one_process_with_workers_trains_from_s3_and_resumes_exactly(bucket, tmp_path) -> None:
    args = [*data_args(bucket), "--data.num_workers=2", "--data.streams=2"]
    run_here(tmp_path / "whole", *args, "--checkpoint.every=3")
    whole = losses(tmp_path / "whole")
    assert sorted(whole) == list(range(1, STEPS + 1)) and whole[STEPS] < whole[1]
    midway = tmp_path / "whole" / "checkpoints" / "step_00000003"
    loader = json.loads((midway / "manifest.json").read_text())["extra"]["loader"]
    assert loader["mode"] == "streaming" and loader["step"] == 3 and len(loader["ranks"]) == 1
    assert [len(reader["buffer"]) for reader in loader["ranks"][0]] == [5, 5], "buffers saved as byte ranges"
    # The workers had built batches ahead of step 3 when it was saved; the resume must start at step 4's batch.
    run_here(tmp_path / "resumed", *args, f"--checkpoint.resume={midway}")
    assert losses(tmp_path / "resumed") == {step: whole[step] for step in range(4, STEPS + 1)}


def test_four_processes_train_from_s3_resume_exactly_and_another_layout_is_announced(bucket, tmp_path, capsys):
    launch(tmp_path / "whole", *data_args(bucket), "--checkpoint.every=3")
    whole = losses(tmp_path / "whole")
    midway = tmp_path / "whole" / "checkpoints" / "step_00000003"
    loader = json.loads((midway / "manifest.json").read_text())["extra"]["loader"]
    assert loader["layout"]["dp_size"] == 4 and [r[0]["reader"] for r in loader["ranks"]] == [0, 1, 2, 3]
    launch(tmp_path / "resumed", *data_args(bucket), f"--checkpoint.resume={midway}")
    assert losses(tmp_path / "resumed") == {step: whole[step] for step in range(4, STEPS + 1)}
    capsys.readouterr()
    run_here(tmp_path / "one", *data_args(bucket), f"--checkpoint.resume={midway}")
    notes = [line for line in capsys.readouterr().err.splitlines() if "fresh shard assignment" in line]
    assert len(notes) == 1 and "dp_size 4 -> 1" in notes[0], notes
    assert sorted(losses(tmp_path / "one")) == [4, 5, 6]
