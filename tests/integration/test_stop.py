"""Stopping and crashing: a stop signal saves and resumes on the uninterrupted trajectory; kill -9 during a save loses
nothing; background (async) saves hold the state of the step they were taken at.

Real 2-process torchrun jobs on gloo; every comparison is against an uninterrupted run of the same layout in
deterministic mode, so it is exact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bigmodel.config import load_config
from bigmodel.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS = 40
# Two data-parallel ranks with ZeRO-1 (optimizer state sharded, so each rank's shards matter), bitwise-repeatable.
JOB = [
    "--parallel.dp_shard=2",
    "--parallel.zero_stage=1",
    f"--train.steps={STEPS}",
    "--train.deterministic=true",
    "--model.dropout=0.1",
    "--log.every=1",
    "--log.progress=false",
    "--log.wandb=disabled",
]


def start_job(out: Path, *args: str) -> subprocess.Popen:
    """`bigmodel launch --nproc 2`, its output in `<out>.log`."""
    cmd = [sys.executable, "-m", "bigmodel.cli.main", "launch", "--nproc", "2", "--config", str(TINY), *JOB]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [*cmd, f"--train.out_dir={out}", *args],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def finish(job: subprocess.Popen, out: Path, timeout: float = 300) -> str:
    """Wait for `job`; return its output, failing with it if the job did not exit 0."""
    try:
        code = job.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_everything(job)
        code = "timeout"
    text = (out.parent / f"{out.name}.log").read_text()
    assert code == 0, f"job {out.name} exited {code}:\n{text[-4000:]}"
    return text


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def wait_for(condition, timeout: float = 120, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {condition.__doc__}")


def workers(job: subprocess.Popen) -> list[psutil.Process]:
    """The training processes: those started by torchrun, whose own command line names bigmodel.train too."""
    found = []
    for proc in psutil.Process(job.pid).children(recursive=True):
        try:
            if all("bigmodel.train" in " ".join(p.cmdline()) for p in (proc, proc.parent())):
                found.append(proc)
        except psutil.Error:  # exited meanwhile
            pass
    return found


def kill_everything(job: subprocess.Popen) -> None:
    """kill -9 the launcher, torchrun and every worker (torchrun puts workers in sessions of their own)."""
    procs = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The uninterrupted 2-process run's loss per step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    finish(start_job(out), out)
    return losses(out)


def test_stop_signal_saves_and_the_resumed_job_matches(tmp_path, reference):
    out = tmp_path / "run"
    # Background saves every 5 steps: the stop must wait for one in flight and then save its own step.
    job = start_job(out, "--checkpoint.every=5", "--checkpoint.async_save=true")

    def two_workers_past_step_8():
        """both workers up and step 8 logged"""
        procs = workers(job)
        return len(procs) == 2 and (out / "metrics.jsonl").exists() and len(losses(out)) >= 8 and procs

    procs = wait_for(two_workers_past_step_8)
    procs[1].send_signal(signal.SIGUSR1)  # one rank only: the other must learn of it and stop at the same step
    text = finish(job, out)
    stopped = json.loads((out / "stopped.json").read_text())
    assert stopped["signal"] == "SIGUSR1" and 8 <= stopped["step"] < STEPS, stopped
    assert Path(stopped["checkpoint"]).name == f"step_{stopped['step']:08d}"
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped['step']:08d}"
    assert "stopped by SIGUSR1" in text
    assert max(losses(out)) == stopped["step"], "training went on after the stop"

    finish(start_job(out, "--checkpoint.every=5", "--checkpoint.async_save=true", "--checkpoint.resume=auto"), out)
    # Same layout, deterministic: the stopped-and-resumed job is bitwise the uninterrupted one, step by step.
    assert losses(out) == reference


def test_kill_during_save_resumes_from_the_previous_checkpoint(tmp_path, reference):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"

    def save_in_progress_after_a_complete_one():
        """a .tmp_ save while a complete checkpoint exists"""
        return (
            checkpoints.is_dir() and any(checkpoints.glob("step_*/manifest.json")) and any(checkpoints.glob(".tmp_*"))
        )

    for _attempt in range(3):  # the save may finish between seeing it and the kill: then try again
        shutil.rmtree(out, ignore_errors=True)
        job = start_job(out, "--checkpoint.every=1", "--checkpoint.keep=100")  # a save every step
        wait_for(save_in_progress_after_a_complete_one, poll=0.001)
        kill_everything(job)
        incomplete = sorted(p.name for p in checkpoints.glob(".tmp_*"))
        if incomplete:
            break
    complete = sorted(p.parent.name for p in checkpoints.glob("step_*/manifest.json"))
    assert incomplete, "every kill came after the save finished; nothing was tested"
    assert incomplete[-1].removeprefix(".tmp_") > complete[-1]

    text = finish(start_job(out, "--checkpoint.resume=auto"), out)  # no saves on the way: checkpoints do not
    # change the trajectory, and forty of them would only cost time
    assert f"skipping incomplete checkpoint {incomplete[-1].removeprefix('.tmp_')}" in text
    assert f"resumed from {checkpoints / complete[-1]}" in text
    # Steps logged before the kill and again after the resume must agree with the reference as well: bitwise.
    assert losses(out) == reference


def test_async_save_holds_the_state_of_its_step(tmp_path):
    """A background save copies the state before training changes it: resuming from it matches exactly."""
    common = [
        "--train.steps=8",
        "--log.every=1",
        "--log.progress=false",
        "--log.wandb=disabled",
        "--train.deterministic=true",
    ]
    whole = train(
        load_config(
            TINY,
            [*common, "--checkpoint.every=2", "--checkpoint.async_save=true", f"--train.out_dir={tmp_path / 'whole'}"],
        )
    )
    saved = sorted(p.name for p in (tmp_path / "whole" / "checkpoints").glob("step_*"))
    assert saved == ["step_00000006", "step_00000008"]  # keep=2; all complete, none left as .tmp_
    assert not list((tmp_path / "whole" / "checkpoints").glob(".tmp_*"))
    resumed = train(
        load_config(
            TINY,
            [
                *common,
                f"--checkpoint.resume={tmp_path / 'whole' / 'checkpoints' / 'step_00000006'}",
                f"--train.out_dir={tmp_path / 'resumed'}",
            ],
        )
    )
    assert losses(tmp_path / "resumed") == {k: v for k, v in losses(tmp_path / "whole").items() if k > 6}
    assert resumed.final_loss == whole.final_loss
