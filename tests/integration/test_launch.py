"""`bigmodel launch`: a real 4-process job (dp2 x tp2) through torchrun, compared with one process."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from bigmodel.config import load_config
from bigmodel.parallel.memory import zero_theory_bytes
from bigmodel.train.loop import train
from tests.support.cli import bigmodel

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
COMMON = ["--train.steps=6", "--log.every=1", "--log.progress=false", "--log.wandb=disabled"]


def build_model_params():
    from bigmodel.losses import active_objectives
    from bigmodel.models import build_model

    cfg = load_config(TINY)
    return list(build_model(cfg.model, active_objectives(cfg.train.loss_weights)).parameters())


def test_dry_run_prints_the_torchrun_command():
    result = bigmodel("launch", "--nproc", "4", "--config", TINY, "--parallel.dp_shard=4", "--dry-run")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("OMP_NUM_THREADS=") and "torchrun --nproc-per-node=4 --standalone -m bigmodel.train" in line
    assert line.endswith(f"--config {TINY} --parallel.dp_shard=4")


@pytest.mark.slow
def test_four_process_job_matches_one_process(tmp_path):
    out = tmp_path / "dp2tp2"
    layout = ["--parallel.dp_shard=2", "--parallel.tp=2", "--log.profile_step=3"]  # profiling changes no number
    result = bigmodel("launch", "--nproc", "4", "--config", TINY, *layout, *COMMON, f"--train.out_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1, "only rank 0 prints the summary"
    assert sorted(p.name for p in (out / "profile").glob("*.json.gz")) == [f"rank{r}.json.gz" for r in range(4)]

    single = train(load_config(TINY, [*COMMON, f"--train.out_dir={tmp_path / 'single'}"]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    # fp32, same seed and global batch: only summation order differs (see docs/parallelism.md), ~1e-7 relative.
    for ours, ref in zip(records, reference, strict=True):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5)

    memory = json.loads((out / "memory.json").read_text())
    assert len(memory) == 4
    # Stage 0 keeps whole (tensor-parallel-sharded) gradients and both Adam moments on every rank: per parameter
    # byte, 1 gradient byte and 2 optimizer bytes (ZeRO theory), within 10% (step counters, padding).
    for rank in memory:
        theory = zero_theory_bytes(rank["params"] // 4, dp=2, stage=0)
        assert abs(rank["grads"] / theory["grads"] - 1) < 0.1, (rank, theory)
        assert abs(rank["optimizer"] / theory["optimizer"] - 1) < 0.1, (rank, theory)
    assert memory[0]["params"] < 0.75 * sum(p.numel() * 4 for p in build_model_params()), "tp2 must shard"

    # The checkpoint holds the gathered weights: one process evaluates them exactly as the job did at the end.
    evaluated = bigmodel("eval", str(out), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    final = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    assert json.loads(evaluated.stdout)["mlm_acc"] == pytest.approx(final["mlm_acc"], abs=1e-9)
    assert single.eval_after["mlm_acc"] == pytest.approx(final["mlm_acc"], abs=1e-9)


@pytest.mark.slow
def test_pipeline_job_evaluates_and_draws_its_timeline(tmp_path):
    out = tmp_path / "pp2"
    layout = ["--parallel.pp=2", "--parallel.microbatches=4", "--log.pp_timeline_step=3", "--log.pp_timeline_steps=2"]
    result = bigmodel("launch", "--nproc", "2", "--config", TINY, *layout, *COMMON, f"--train.out_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "idle fraction" in result.stderr

    # The reference accumulates over the same 4 microbatches on one process.
    single = train(load_config(TINY, [*COMMON, "--train.grad_accum=4", f"--train.out_dir={tmp_path / 'single'}"]))
    final = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    # Evaluated through the pipeline (forward only, outputs broadcast from the last stage to rank 0): the same
    # metrics as one process, up to argmax ties flipped by ~1e-7 differences (at most 2 of 128 samples, 0.016).
    for metric in ("i2t_r1", "t2i_r1", "itm_acc", "mlm_acc"):
        assert final[metric] == pytest.approx(single.eval_after[metric], abs=0.016), metric

    trace = json.loads((out / "timeline.json").read_text())["traceEvents"]
    work = [e for e in trace if e["ph"] == "X"]
    for stage in (0, 1):
        for kind in ("forward", "backward"):
            count = sum(e["cat"] == kind and e["args"]["stage"] == stage for e in work)
            assert count == 4, (stage, kind, count)  # one per microbatch
    assert (out / "timeline.png").stat().st_size > 10_000
    summary = json.loads((out / "timeline_summary.json").read_text())
    assert 0 < summary["measured_bubble"] < 1 and summary["theoretical_bubble"] == pytest.approx(1 / 5)
    # Steps 3 and 4 recorded; the reported step is one of them (the median of two is the lower).
    assert summary["steps_recorded"] == 2
    assert summary["measured_bubble"] == min(summary["measured_bubble_per_step"])


@pytest.mark.slow
def test_checkpoint_from_two_processes_resumes_on_one(tmp_path):
    common = ["--train.steps=6", "--log.every=1", "--log.progress=false", "--log.wandb=disabled"]
    layout = ["--parallel.dp_shard=2", "--parallel.zero_stage=1", "--checkpoint.every=3"]
    result = bigmodel(
        "launch", "--nproc", "2", "--config", TINY, *layout, *common, f"--train.out_dir={tmp_path / 'dp2'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    midway = tmp_path / "dp2" / "checkpoints" / "step_00000003"
    resumed = train(
        load_config(TINY, [*common, f"--checkpoint.resume={midway}", f"--train.out_dir={tmp_path / 'one'}"])
    )
    reference = train(load_config(TINY, [*common, f"--train.out_dir={tmp_path / 'ref'}"]))
    ours = [json.loads(line)["loss"] for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line)["loss"] for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    # Saved with ZeRO-1 chunks over 2 ranks (optimizer state included), loaded whole on one process: the remaining
    # steps follow the one-process trajectory up to the summation-order differences of the first 3 steps (~1e-7).
    assert ours == pytest.approx(ref[3:], rel=1e-5)
    assert resumed.final_loss == pytest.approx(reference.final_loss, rel=1e-5)

    # Resuming on 2 processes, each checks its own shard file: the one rank 1 checks is corrupt, and every rank
    # stops with rank 1's one-line error before loading anything; the main rank, which did not read that file,
    # prints it.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(midway, corrupt)
    shard = corrupt / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    failed = bigmodel(
        "launch", "--nproc", "2", "--config", TINY, *layout, *common, f"--checkpoint.resume={corrupt}",
        f"--train.out_dir={tmp_path / 'again'}",
    )  # fmt: skip
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("__1_0.distcp does not match its xxh3_128 checksum" in e for e in errors), failed.stderr


@pytest.mark.slow
def test_interleaved_pipeline_checkpoint_resumes_on_one_process(tmp_path):
    # Two stages per rank (interleaved 1F1B): the optimizer state of both stages goes into one layout-free checkpoint.
    model = ["--model.vision_layers=4", "--model.text_layers=4"]
    common = [*model, "--train.steps=6", "--log.every=1", "--log.progress=false", "--log.wandb=disabled"]
    layout = ["--parallel.pp=2", "--parallel.microbatches=4", "--parallel.pp_schedule=interleaved_1f1b"]
    out = tmp_path / "pp2"
    result = bigmodel(
        "launch", "--nproc", "2", "--config", TINY, *layout, *common, "--checkpoint.every=3", f"--train.out_dir={out}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one = [*common, "--train.grad_accum=4"]  # one process accumulating over the same 4 microbatches
    midway = out / "checkpoints" / "step_00000003"
    train(load_config(TINY, [*one, f"--checkpoint.resume={midway}", f"--train.out_dir={tmp_path / 'one'}"]))
    train(load_config(TINY, [*one, f"--train.out_dir={tmp_path / 'ref'}"]))
    ours = [json.loads(line)["loss"] for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line)["loss"] for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    # Same reasoning as above: only summation order differs before the save (~1e-7 relative).
    assert ours == pytest.approx(ref[3:], rel=1e-5)


def test_dry_run_with_dp_shard_minus_one_fits_or_is_one_line():
    fits = bigmodel("launch", "--nproc", "4", "--config", TINY, "--parallel.dp_shard=-1", "--dry-run")
    assert fits.returncode == 0, fits.stderr
    odd = bigmodel("launch", "--nproc", "3", "--config", TINY, "--parallel.dp_shard=-1", "--parallel.tp=2", "--dry-run")
    assert odd.returncode == 2 and odd.stderr.strip().splitlines() == [
        "error: parallel.dp_shard=-1 takes the processes that parallel.dp_replicate=1 x tp=2 x pp=1 = 2 leave, but 3 "
        "processes are not a multiple of 2; start a multiple of 2 processes or change those degrees"
    ], odd.stderr


def test_dry_run_multi_node_and_restarts():
    result = bigmodel(
        "launch",
        "--nproc",
        "2",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--rdzv-endpoint",
        "10.0.0.1:29400",
        "--max-restarts",
        "3",
        "--config",
        TINY,
        "--parallel.dp_shard=4",
        "--checkpoint.every=5",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nproc-per-node=2 --nnodes=2 --node-rank=1" in line
    assert "--rdzv-backend=c10d --rdzv-endpoint=10.0.0.1:29400 --max-restarts=3 -m bigmodel.train" in line
    # Restarted workers must continue from the newest checkpoint, not from step 0.
    assert line.endswith("--checkpoint.every=5 --checkpoint.resume=auto")


def test_dry_run_deepspeed_launcher(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    result = bigmodel(
        "launch",
        "--launcher",
        "deepspeed",
        "--hostfile",
        str(hostfile),
        "--nproc",
        "2",
        "--config",
        TINY,
        "--parallel.dp_shard=2",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    # One local host: no ssh check, loopback master (shared/notes/deepspeed-accelerate-cpu.md); no --local_rank.
    assert f"deepspeed --num_gpus=2 --hostfile={hostfile} --num_nodes=1 --no_ssh_check --master_addr=127.0.0.1 " in (
        result.stdout
    )
    assert "--no_local_rank --module bigmodel.train --config" in result.stdout
    refused = bigmodel("launch", "--launcher", "deepspeed", "--max-restarts", "1", "--nproc", "1", "--config", TINY)
    assert refused.returncode == 2
    assert "error: --max-restarts needs --launcher torchrun" in refused.stderr


def test_deepspeed_launcher_without_pdsh_says_how_to_start_the_hosts(tmp_path):
    # Several hosts in the hostfile and no --node-rank: the launcher would start them with pdsh, which is missing
    # from this PATH (the interpreter's folder only): one line naming it and the two ways out, nothing started.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    args = ["launch", "--launcher", "deepspeed", "--hostfile", str(hostfile), "--nnodes", "2", "--nproc", "2"]
    result = bigmodel(
        *args,
        "--config",
        TINY,
        "--parallel.dp_replicate=4",
        f"--train.out_dir={tmp_path / 'run'}",
        env={**os.environ, "PATH": str(Path(sys.executable).parent)},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the deepspeed launcher starts the other hosts with pdsh, which is not installed here: install it "
        "(apt-get install pdsh), or run the command on every node with --node-rank R --rdzv-endpoint HOST:PORT"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_deepspeed_launcher_runs_the_native_engine(tmp_path):
    # The launcher is independent of the engine: the deepspeed launcher's variables (RANK, WORLD_SIZE, LOCAL_RANK,
    # LOCAL_SIZE, MASTER_ADDR) are what read_dist_env reads, so the native dp2 job runs unchanged under it.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "ds"
    common = [*COMMON, "--data.eval_size=32", "--train.eval_batch_size=32"]
    result = bigmodel(
        "launch",
        "--launcher",
        "deepspeed",
        "--hostfile",
        str(hostfile),
        "--nproc",
        "2",
        "--config",
        TINY,
        "--parallel.dp_shard=2",
        *common,
        f"--train.out_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads((out / "memory.json").read_text())) == 2, "two processes"
    train(load_config(TINY, [*common, f"--train.out_dir={tmp_path / 'one'}"]))
    ours = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line)["loss"] for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    # dp2 against one process: only summation order differs (~1e-7 relative, see docs/parallelism.md).
    assert ours == pytest.approx(ref, rel=1e-5)


def test_container_files_match_ci():
    """Docker can't run here: check the images install what CI installs and copy only what exists, and that the
    Kubernetes example parses and starts the training module under torchrun."""
    import re

    import yaml

    torch_spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    for name in ("cpu.Dockerfile", "gpu.Dockerfile"):
        text = (ROOT / "docker" / name).read_text()
        assert f"ARG TORCH_VERSION={torch_spec}" in text, name
        assert text.index("torch==${TORCH_VERSION}") < text.index('-e ".['), f"{name}: torch first, as CI"
        for sources in re.findall(r"^COPY (.+) \S+$", text, re.M):
            for source in sources.split():
                assert (ROOT / source).exists(), f"{name} copies {source}, which does not exist"
    assert 'pip install --no-cache-dir -e ".[dev]"' in (ROOT / "docker" / "cpu.Dockerfile").read_text()
    assert "DS_BUILD_FUSED_ADAM=1" in (ROOT / "docker" / "gpu.Dockerfile").read_text()

    service, job = yaml.safe_load_all((ROOT / "launch" / "kubernetes" / "train-job.yaml").read_text())
    assert service["kind"] == "Service" and job["kind"] == "Job"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command = container["args"][0]
    assert command.startswith("exec torchrun") and "-m bigmodel.train --config configs/base.yaml" in command
    assert f"--rdzv-endpoint={job['metadata']['name']}-0.{service['metadata']['name']}:29400" in command
    assert (ROOT / "configs" / "base.yaml").is_file()
