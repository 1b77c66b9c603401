"""The `bigmodel` command as users run it: real subprocesses, exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUIET = ["--log.progress=false", "--log.wandb=disabled"]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bigmodel.cli.main", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["data"], ["data", "make-shapes"], ["info"]])
def test_help_of_every_command(command):
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: bigmodel" in result.stdout


def test_train_then_eval_from_the_run_directory(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "bigmodel.train", "--config", TINY, *QUIET, "--train.steps=6", f"--train.out_dir={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "held-out after training" in result.stdout
    evaluated = run("eval", str(out), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    final = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    # Same weights, same held-out batches, same kernels: the standalone evaluation reproduces the run's own.
    assert metrics["i2t_r1"] == final["i2t_r1"]
    assert metrics["mlm_acc"] == final["mlm_acc"]


def test_train_on_webdataset_shards(tmp_path):
    made = run("data", "make-shapes", "--out", str(tmp_path / "shards"), "--train-size", "64", "--eval-size", "32")
    assert made.returncode == 0, made.stderr
    train = str(tmp_path / "shards" / "train-{000000..000000}.tar")
    evals = str(tmp_path / "shards" / "eval-{000000..000000}.tar")
    result = run(
        "train", "--config", TINY, *QUIET, "--train.steps=3", f"--train.out_dir={tmp_path / 'run'}",
        "--data.source=shards", f"--data.train_shards={train}", f"--data.eval_shards={evals}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "--config", TINY, "--train.steps=0"], "train.steps"),
        (["train", "--config", TINY, "--model.fusin=none"], "did you mean model.fusion"),
        (["train", "--config", "missing.yaml"], "does not exist"),
        (["train", "--config", TINY, "--verbose"], "unrecognised argument"),
        (["train", "--config", TINY, "--data.source=shards", "--data.train_shards=/nowhere/x-{0..1}.tar"], "nowhere"),
        (["train", "--config", TINY, "--data.tokenizer=/nowhere/tok.json"], "tok.json"),
        (["train", "--config", TINY, "--model.vocab_size=16"], "model.vocab_size"),
        (["eval", "/nowhere/run"], "/nowhere/run"),
        (["info", "--config", TINY, "--parallel.pp=2"], "needs parallel.microbatches >= parallel.pp=2"),
        (["info", "--config", TINY, "--engine=deepspeed", "--parallel.pp=2", "--parallel.microbatches=2"], "pipelines"),
        (["slurm", "submit", "--config", TINY, "--nodes", "1"], "--nproc-per-node"),
        (["launch", "--config", TINY, "--nproc", "4", "--parallel.tp=2"], "needs 2 processes but 4"),
        (["launch", "--config", TINY, "--nproc", "2", "--parallel.tp=3"], "parallel.tp=3 does not divide"),
        (["verify", "--config", TINY, "--layouts", "dp2,tq2"], "cannot read 'tq2'"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, args, expected):
    result = run(*args, f"--train.out_dir={tmp_path / 'run'}" if args[0] != "eval" else "--json")
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "run").exists(), "a rejected run must not create its run directory"


def test_info_prints_parameters_and_flops():
    result = run("info", "--config", str(ROOT / "configs" / "base.yaml"))
    assert result.returncode == 0, result.stderr
    assert "parameters:" in result.stdout and "training FLOPs per sample" in result.stdout


def test_corrupt_checkpoint_is_refused_naming_the_file(tmp_path):
    out = tmp_path / "run"
    made = run("train", "--config", TINY, *QUIET, "--train.steps=3", "--train.warmup_steps=0", f"--train.out_dir={out}")
    assert made.returncode == 0, made.stderr
    checkpoint = out / "checkpoints" / "step_00000003"
    shard = next(checkpoint.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit-pattern in the middle of the shard
    shard.write_bytes(bytes(data))
    for args in (["eval", str(out)], ["train", "--config", TINY, *QUIET, "--train.steps=4", f"--resume={checkpoint}"]):
        result = run(*args, f"--train.out_dir={tmp_path / 'other'}" if args[0] == "train" else "--json")
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and shard.name in lines[-1], result.stderr
