"""Training in indexed mode on shards served by a real S3 server on loopback (moto), through `bigmodel data index`
and `bigmodel train` / `bigmodel launch` as a user runs them: the losses equal those of the same shards read from
local disk, bit for bit, with one process (and loader workers forked with an S3 client) and with four ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigmodel.data.shards import write_shapes_shards

pytestmark = pytest.mark.slow  # four short runs, one of them four processes

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
STEPS = 4
COMMON = [
    "--log.every=1",
    "--log.progress=false",
    "--log.wandb=disabled",
    "--data.source=shards",
    "--data.mode=indexed",
]


def bigmodel(*args: str) -> str:
    """Run `bigmodel ARGS` (with the S3 server's AWS_* variables in the environment) and return its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.run(
        [sys.executable, "-m", "bigmodel.cli.main", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert job.returncode == 0, f"exit {job.returncode}:\n{job.stdout[-4000:]}"
    return job.stdout


def train_args(base: str, out: Path, *extra: str) -> list[str]:
    data = [f"--data.train_shards={base}/train-{{000000..000003}}.tar", f"--data.eval_shards={base}/eval-000000.tar"]
    return ["--config", TINY, *COMMON, *data, f"--train.steps={STEPS}", f"--train.out_dir={out}", *extra]


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [r["loss"] for r in records]


def test_indexed_training_from_s3_equals_local_disk_bit_for_bit(s3_server, tmp_path):
    local = tmp_path / "shards"
    write_shapes_shards(local, 64, 16, image_size=32, max_shapes=2, samples_per_shard=16)
    remote = s3_server.upload(local, s3_server.new_bucket(), "shapes")
    printed = bigmodel("data", "index", f"{remote}/train-{{000000..000003}}.tar::{remote}/eval-000000.tar")
    assert "indexed 4 shards (64 samples)" in printed and "indexed 1 shards (16 samples)" in printed
    # Same layout, same samples: only where the bytes come from differs, so the losses must be identical.
    bigmodel("train", *train_args(str(local), tmp_path / "local"))
    bigmodel("train", *train_args(remote, tmp_path / "s3", "--data.num_workers=2"))
    assert losses(tmp_path / "s3") == losses(tmp_path / "local")
    dp4 = ["launch", "--nproc", "4", "--parallel.dp_shard=4"]
    bigmodel(*dp4, *train_args(str(local), tmp_path / "local_dp4"))
    bigmodel(*dp4, *train_args(remote, tmp_path / "s3_dp4"))
    assert losses(tmp_path / "s3_dp4") == losses(tmp_path / "local_dp4")
