"""The sample ledger of real runs on WebDataset shards: identical for one process and four data-parallel ranks with
loader workers and accumulation, identical across kill -9 and resume, and `bigmodel data audit` names the shard a
run skipped because it was corrupt.

One set of runs (module-scoped, in this order since the last one corrupts a shard in place): a one-process
reference, a 4-process job, a one-process run killed with SIGKILL after a checkpoint and resumed, and a run on the
same shard URLs after one shard's images were made undecodable.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from bigmodel.data.ledger import LEDGER_DIR, RunLedger, rank_file, read_records

pytestmark = pytest.mark.slow  # about 40 s: five short runs, one of them four processes with loader workers

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
STEPS = 8
SAMPLES, PER_SHARD = 64, 16  # four train shards; global batch 16
COMMON = ["--log.every=1", "--log.progress=false", "--log.wandb=disabled", "--data.source=shards"]


def bigmodel(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bigmodel.cli.main", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(job: subprocess.Popen, expect: int = 0) -> str:
    out, _ = job.communicate(timeout=300)
    assert job.returncode == expect, f"exit {job.returncode}:\n{out[-4000:]}"
    return out


def train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    data = [
        f"--data.train_shards={shards}/train-{{000000..000003}}.tar",
        f"--data.eval_shards={shards}/eval-000000.tar",
    ]
    return ["--config", TINY, *COMMON, *data, f"--train.steps={STEPS}", f"--train.out_dir={out}", *extra]


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {condition.__doc__}"
        time.sleep(0.02)


def make_undecodable(shard: Path) -> None:
    """Rewrite a shard with the same members, every image replaced by bytes that do not decode."""
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar if info.isfile()]
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            if info.name.endswith(".png"):
                data = b"not an image"
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def kill_after_a_checkpoint(shards: Path, out: Path) -> tuple[int, list[int]]:
    """Train and SIGKILL the run once its ledger holds a step after its latest checkpoint; return the latest
    checkpoint's step and the steps recorded when it died."""
    job = bigmodel("train", *train_args(shards, out, "--checkpoint.every=2"))
    ledger, latest = rank_file(out / LEDGER_DIR, 0), out / "checkpoints" / "latest"

    def saved() -> int:
        return int(latest.read_text().removeprefix("step_")) if latest.exists() else 0

    def past_a_checkpoint():
        """a complete checkpoint and a ledger record after it"""
        recorded = [r.step for _, r in read_records(ledger)] if ledger.exists() else []
        return saved() and recorded[-1] > saved()

    wait_for(past_a_checkpoint)
    job.send_signal(signal.SIGKILL)
    job.communicate(timeout=60)
    return saved(), [r.step for _, r in read_records(ledger)]


def killed_and_resumed(shards: Path, out: Path) -> dict:
    """A run killed with SIGKILL while its ledger holds steps after its latest checkpoint, then resumed."""
    for _attempt in range(3):  # a save may complete between seeing the state and the kill: then try again
        shutil.rmtree(out, ignore_errors=True)
        saved, recorded = kill_after_a_checkpoint(shards, out)
        if saved < recorded[-1] < STEPS:
            break
    assert saved < recorded[-1] < STEPS, "every kill came after a save of the last step recorded; nothing was tested"
    log = finish(bigmodel("train", *train_args(shards, out, "--checkpoint.every=2", "--checkpoint.resume=auto")))
    return {"saved": saved, "log": log}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ledger")
    shards = root / "shards"
    args = ["--train-size", str(SAMPLES), "--eval-size", "16", "--samples-per-shard", str(PER_SHARD)]
    finish(bigmodel("data", "make-shapes", "--out", str(shards), "--image-size", "32", *args))
    finish(bigmodel("train", *train_args(shards, root / "dp1")))
    dp4 = ["--nproc", "4", "--parallel.dp_shard=4", "--data.num_workers=2", "--train.grad_accum=2"]
    finish(bigmodel("launch", *dp4, *train_args(shards, root / "dp4")))
    resumed = killed_and_resumed(shards, root / "resumed")
    make_undecodable(shards / "train-000002.tar")
    finish(bigmodel("train", *train_args(shards, root / "corrupt", f"--train.steps={STEPS // 2}")))
    return {"root": root, "shards": shards, "resumed": resumed}


def audit(runs: dict, a: str, b: str, expect: int) -> list[str]:
    return finish(bigmodel("data", "audit", str(runs["root"] / a), str(runs["root"] / b)), expect).splitlines()


def final_chain_hash(run: Path) -> str:
    manifest = json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json").read_text())
    return manifest["extra"]["ledger"]["hash"]


def test_one_process_and_four_ranks_with_workers_record_the_same_samples(runs):
    assert audit(runs, "dp1", "dp4", 0) == [f"runs agree on steps 1..{STEPS} ({STEPS * 16} samples)"]
    dp4 = runs["root"] / "dp4" / LEDGER_DIR
    assert sorted(p.name for p in dp4.glob("rank-*.bin")) == [f"rank-{r:05d}.bin" for r in range(4)]
    # The per-step hashes and the checkpoint's chain hash do not depend on the layout either.
    steps = [(runs["root"] / run / LEDGER_DIR / "steps.jsonl").read_text() for run in ("dp1", "dp4")]
    assert steps[0] == steps[1] and len(steps[0].splitlines()) == STEPS
    assert final_chain_hash(runs["root"] / "dp1") == final_chain_hash(runs["root"] / "dp4")


def test_a_killed_and_resumed_run_records_what_the_uninterrupted_one_does(runs):
    resumed = runs["resumed"]
    assert "does not match the checkpoint" not in resumed["log"]
    checkpoint = runs["root"] / "resumed" / "checkpoints" / f"step_{resumed['saved']:08d}"
    assert f"resumed from {checkpoint}" in resumed["log"]
    assert audit(runs, "dp1", "resumed", 0) == [f"runs agree on steps 1..{STEPS} ({STEPS * 16} samples)"]
    assert final_chain_hash(runs["root"] / "resumed") == final_chain_hash(runs["root"] / "dp1")


def test_audit_names_the_skipped_shard(runs):
    reference = RunLedger(runs["root"] / "dp1")
    url = str(runs["shards"] / "train-000002.tar")
    # Where the reference first used a sample of the corrupted shard: the first difference the audit must report.
    first = next(
        (step.step, position, int(rank), reference.name(int(sid)))
        for step in reference.steps()
        for position, (sid, rank) in enumerate(zip(step.ids, step.ranks, strict=True))
        if reference.name(int(sid)).startswith(url)
    )
    lines = audit(runs, "dp1", "corrupt", 1)
    step, position, rank, sample = first
    # Every image of shard 2 fails to decode, so its samples are replaced by the next usable one: shard 3's first.
    substitute = f"{runs['shards'] / 'train-000003.tar'} member 0"
    assert lines[-1] == (
        f"runs differ at step {step}, position {position} of the global batch: {runs['root'] / 'dp1'} has {sample} "
        f"(rank {rank}), {runs['root'] / 'corrupt'} has {substitute} (rank 0)"
    )
