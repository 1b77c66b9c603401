"""The DeepSpeed engine against the single-process reference and the native engine, its checkpoints (exact resume,
conversion to the sharded format, resuming that under the native engine) and its start by the deepspeed launcher.

Real processes on gloo throughout: `bigmodel.tools.verify.verify` (what `bigmodel verify` runs) for the loss
trajectories, deepspeed_worker.py for checkpoints, and `deepspeed --num_gpus 2 --module bigmodel.train` for
the launcher. Tolerances are stated next to the asserts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigmodel.checkpoint.deepspeed import FORMAT, from_deepspeed
from bigmodel.checkpoint.manifest import read_manifest, verify_manifest
from bigmodel.checkpoint.run import LATEST_FILE
from bigmodel.checkpoint.sharded import load_sharded
from bigmodel.checkpoint.tools import ModelTensors
from bigmodel.config import load_config
from bigmodel.data import build_train_loader
from bigmodel.engines import build_engine
from bigmodel.parallel.context import setup_parallel
from bigmodel.tools.verify import format_table, verify
from bigmodel.train.loop import split_microbatches
from tests.distributed.launch import run_worker

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "configs" / "tiny.yaml")
# Every ZeRO-3 parameter partitioned (the tiny model's tensors are all below DeepSpeed's usual threshold of 1e5).
BASE = ["--log.wandb=disabled", "--deepspeed.param_persistence_threshold=0"]
STEPS = 10
SHORT = 5  # accumulation/offload and bf16: the stages' 10-step check above covers the long trajectory
STAGES = [0, 1, 2, 3]

# fp32: DeepSpeed's ZeRO stages differ from one process only in the order of sums (all-reduce, reduce-scatter of
# the same gradients), a few ulps, ~1e-7 relative; a wrong clipping default (DeepSpeed's own is 1.0), a missing
# accumulation scale or a wrong schedule moves the 10-step losses by >= 1e-3. Gradients: relative to the model's
# largest gradient element, as for every layout (see bigmodel.tools.verify.TOLERANCES).
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-6
ONE_PROCESS = ["--parallel.dp_shard=1", "--parallel.zero_stage=0"]


@pytest.fixture(autouse=True)
def cpu_accelerator(monkeypatch):
    """DeepSpeed's accelerator, said rather than detected (detection warns), for this process and its children."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def assert_passes(report) -> None:
    table = format_table(report.comparisons, report.loss_rtol, report.grad_rtol)
    for comparison in report.comparisons:
        assert not comparison.missing and not comparison.zeroed, table
        assert comparison.max_loss_rel <= report.loss_rtol, table
        assert comparison.max_grad_rel <= report.grad_rtol, table


def test_zero_stages_follow_the_reference_and_the_native_engine(tmp_path):
    layouts = ["ds-dp2", "ds-zero1x2", "ds-zero2x2", "ds-zero3x2", "zero2x2"]
    report = verify(TINY, BASE, layouts, STEPS, tmp_path, LOSS_RTOL, GRAD_RTOL)
    assert_passes(report)
    # The reference must actually train, or equal trajectories would prove little.
    assert report.reference.losses[-1] < 0.95 * report.reference.losses[0]
    native = report.traces["zero2x2"].losses
    for layout in layouts[:-1]:
        deepspeed = report.traces[layout].losses
        assert max(abs(a - b) / b for a, b in zip(deepspeed, native, strict=True)) <= LOSS_RTOL, layout


def test_accumulation_and_cpu_offload_follow_the_reference(tmp_path):
    # Two microbatches per step, optimizer state and parameters offloaded to CPU memory (ZeRO-3): the same sums in
    # another place, so the fp32 tolerances hold. quick_gelu blocks, CLIP's activation, through ZeRO-3's
    # parameter-gathering hooks on every linear layer.
    overrides = [*BASE, "--train.grad_accum=2", "--deepspeed.offload_optimizer=true", "--deepspeed.offload_param=true"]
    overrides.append("--model.activation=quick_gelu")
    report = verify(TINY, overrides, ["ds-zero3x2"], SHORT, tmp_path, LOSS_RTOL, GRAD_RTOL)
    assert_passes(report)


def test_bf16_follows_the_bf16_reference(tmp_path):
    # bf16 is torch autocast over fp32 weights, gradients and reductions in both engines; bf16 rounds activations
    # to 8 mantissa bits (~4e-3 relative), so runs that sum in another order agree to 1e-2, not to fp32's 1e-5.
    report = verify(TINY, [*BASE, "--train.precision=bf16"], ["ds-zero2x2"], SHORT, tmp_path)
    assert report.loss_rtol == 1e-2
    assert_passes(report)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(the worker's results, its root folder): ZeRO 0-3 checkpoints of 2 processes, from one launch."""
    root = tmp_path_factory.mktemp("deepspeed_ckpt")
    results = run_worker(2, Path(__file__).with_name("deepspeed_worker.py"), root / "results.json", "--root", str(root))
    return results, root


@pytest.mark.parametrize("stage", STAGES)
def test_resume_in_the_same_layout_is_exact(checkpoints, stage):
    result = checkpoints[0][str(stage)]
    # A fresh engine starts far from the saved state, so the exact match below is the load's doing.
    assert result["fresh_max_abs"] > 1e-4
    assert result["loaded_max_abs"] == 0.0
    # Same layout, same values, same arithmetic: the continued losses are bit for bit the uninterrupted ones.
    assert result["resumed"] == result["original"]
    assert result["extra_step"] == 2


def test_another_layout_is_refused_in_one_line(checkpoints):
    error = checkpoints[0]["other_layout_error"]
    assert error is not None and "\n" not in error
    assert "ZeRO-0" in error and "ZeRO-1" in error and "from-deepspeed" in error


def test_checkpoint_folder_keeps_manifest_latest_and_keep(checkpoints):
    root = checkpoints[1] / "zero2" / "checkpoints"
    assert (root / LATEST_FILE).read_text() == "step_00000002"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002"]  # keep=1 removed step 1
    folder = root / "step_00000002"
    manifest = read_manifest(folder)
    assert manifest["format"] == FORMAT and manifest["step"] == 2 and manifest["world_size"] == 2
    assert "global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt" in manifest["files"]
    assert (folder / "latest").read_text() == "global_step2"  # DeepSpeed's tools accept the folder
    verify_manifest(folder)


def test_native_engine_refuses_a_deepspeed_checkpoint(checkpoints):
    cfg = load_config(TINY, ["--log.wandb=disabled"])
    engine = build_engine(cfg, setup_parallel(cfg))
    with pytest.raises(ValueError, match="from-deepspeed"):
        load_sharded(checkpoints[1] / "zero2" / "checkpoints" / "step_00000002", engine)
    with pytest.raises(ValueError, match="from-deepspeed"):  # the offline tools (inspect, consolidate, ...) likewise
        ModelTensors(checkpoints[1] / "zero2" / "checkpoints" / "step_00000002")


def converted(checkpoints, stage: int, out: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """from_deepspeed of the worker's checkpoint at `stage` into `out`, and the tensors the engine gathered."""
    root = checkpoints[1] / f"zero{stage}"
    return from_deepspeed(root, out, progress=False), torch.load(root / "saved_state.pt")


@pytest.mark.parametrize("stage", STAGES)
def test_from_deepspeed_gives_the_engines_weights_exactly(checkpoints, stage, tmp_path):
    path, saved = converted(checkpoints, stage, tmp_path / "out")
    tensors = ModelTensors(path)
    # Conversion copies fp32 values, so every tensor is exactly the engine's gathered one (and DeepSpeed's own
    # zero_to_fp32 reconstruction), and every moment exactly DeepSpeed's gathered optimizer state.
    weights = {k.removeprefix("model."): v for k, v in saved.items() if k.startswith("model.")}
    assert sorted(tensors.shapes) == sorted(weights)
    assert max((tensors.read(name) - value).abs().max().item() for name, value in weights.items()) == 0.0
    if stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        reference = get_fp32_state_dict_from_zero_checkpoint(
            str(checkpoints[1] / f"zero{stage}/checkpoints/step_00000002")
        )
        assert max((tensors.read(name) - value).abs().max().item() for name, value in reference.items()) == 0.0
    cfg = load_config(tmp_path / "out" / "config.yaml", ONE_PROCESS)
    assert cfg.engine == "native"
    engine = build_engine(cfg, setup_parallel(cfg))
    extra = engine.load_checkpoint(path)
    assert extra["step"] == 2
    state = engine.state_dict()
    moments = {f"optim.{k}": v for k, v in state["optim"].items() if k.endswith(("exp_avg", "exp_avg_sq"))}
    assert len(moments) == 2 * len(weights)
    if stage in (0, 3):  # the stages whose moments DeepSpeed gathers (see the worker)
        assert max((moments[k] - v).abs().max().item() for k, v in saved.items() if k in moments) == 0.0
    else:  # ZeRO 1-2 trained the same trajectory as ZeRO-3 (same losses): moments equal up to summation order
        zero3 = torch.load(checkpoints[1] / "zero3" / "saved_state.pt")
        scale = max(v.abs().max().item() for k, v in zero3.items() if k in moments)
        assert max((moments[k] - zero3[k]).abs().max().item() for k in moments) <= 1e-6 * scale
    assert engine.scheduler.last_epoch == 2


@pytest.mark.parametrize("stage", [1, 3])
def test_converted_checkpoint_continues_under_the_native_engine(checkpoints, stage, tmp_path):
    path, _ = converted(checkpoints, stage, tmp_path / "out")
    cfg = load_config(tmp_path / "out" / "config.yaml", ONE_PROCESS)
    ctx = setup_parallel(cfg)
    engine = build_engine(cfg, ctx)
    extra = engine.load_checkpoint(path)
    loader = build_train_loader(cfg)
    loader.load_state_dict(extra["loader"])
    batches = iter(loader)
    losses = [engine.train_step(split_microbatches(next(batches), 1)).loss for _ in range(2)]
    # One process against the 2-process DeepSpeed run it continues: the same samples, weights, moments and lr,
    # summed in another order (a few ulps); a lost moment or a reset schedule moves the second loss by >= 1e-3.
    original = checkpoints[0][str(stage)]["original"]
    assert max(abs(a - b) / b for a, b in zip(losses, original, strict=True)) <= LOSS_RTOL, (losses, original)


def test_from_deepspeed_refuses_a_native_checkpoint_and_a_used_directory(checkpoints, tmp_path):
    path, _ = converted(checkpoints, 2, tmp_path / "out")
    with pytest.raises(ValueError, match="not a deepspeed-engine checkpoint"):
        from_deepspeed(path, tmp_path / "again", progress=False)
    with pytest.raises(ValueError, match="is not empty"):
        from_deepspeed(checkpoints[1] / "zero2", tmp_path / "out", progress=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_launcher_trains_checkpoints_and_resumes(tmp_path):
    """`deepspeed --num_gpus 2` starts bigmodel.train with engine=deepspeed (CPU: one process per "GPU"); the
    deepspeed launcher would append --local_rank=N, which bigmodel reads from LOCAL_RANK instead (--no_local_rank).
    A torchrun job then resumes its step-2 checkpoint and must log the same losses for steps 3-4."""
    train = [
        "--config",
        TINY,
        "--engine=deepspeed",
        "--parallel.dp_shard=2",
        "--parallel.zero_stage=2",
        "--train.steps=4",
        "--train.warmup_steps=1",
        "--checkpoint.every=2",
        "--log.every=1",
        "--log.progress=false",
        "--log.wandb=disabled",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = Path(sys.executable).parent / "deepspeed"
    first = tmp_path / "first"
    cmd = [str(launcher), "--num_gpus", "2", "--no_local_rank", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(free_port()), "--module", "bigmodel.train", *train, f"--train.out_dir={first}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoint = first / "checkpoints" / "step_00000002"
    assert read_manifest(checkpoint)["format"] == FORMAT
    assert (first / "checkpoints" / LATEST_FILE).read_text() == "step_00000004"

    second = tmp_path / "second"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "bigmodel.train"]
    cmd += [*train, f"--train.out_dir={second}", f"--resume={checkpoint}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def losses(run: Path) -> dict[int, float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    uninterrupted, resumed = losses(first), losses(second)
    assert sorted(uninterrupted) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    # Same layout, engine and data position: the resumed steps repeat the uninterrupted ones bit for bit.
    assert [resumed[s] for s in (3, 4)] == [uninterrupted[s] for s in (3, 4)]
