"""Two "nodes" on loopback: two `bigmodel launch --nnodes 2` commands (2 processes each) meeting at a c10d rendezvous
on 127.0.0.1 train exactly what one 4-process `bigmodel launch` trains."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
RUN = [
    "--parallel.dp_shard=2",
    "--parallel.dp_replicate=2",
    "--train.steps=5",
    "--log.every=1",
    "--log.progress=false",
    "--log.wandb=disabled",
    "--checkpoint.save_final=false",
    "--data.eval_size=32",
    "--train.eval_batch_size=32",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bigmodel.cli.main", "launch", "--config", TINY, *RUN, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen) -> tuple[str, str]:
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"launch still running after 300 s:\n{err[-3000:]}") from None
    assert process.returncode == 0, err[-3000:]
    return out, err


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_nodes_over_loopback_match_one_node(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        launch(
            "--nproc",
            "2",
            "--nnodes",
            "2",
            "--node-rank",
            str(rank),
            "--rdzv-endpoint",
            endpoint,
            f"--train.out_dir={tmp_path / 'two'}",
        )
        for rank in (0, 1)
    ]
    outputs = [finish(node) for node in nodes]
    assert sum(out.count("run directory:") for out, _ in outputs) == 1, "one process in the job prints the summary"

    finish(launch("--nproc", "4", f"--train.out_dir={tmp_path / 'one'}"))
    # The same 4 ranks, layout, seed and batches; the rendezvous only decides which agent hosts which ranks, and
    # every rank runs the same collectives in the same order: identical losses (measured: bit for bit).
    assert losses(tmp_path / "two") == losses(tmp_path / "one")
    assert len(losses(tmp_path / "one")) == 5
