"""The central test: every layout reproduces the single-process reference (same model, seed and global batch).

Each check runs `bigmodel.tools.verify.verify`, the library behind `bigmodel verify`: the reference trains in
this process, each layout under torchrun on gloo (layouts of one world size share a launch), and the per-step
losses and first-step gradients are compared. Tolerances and their reasoning are in verify.TOLERANCES; they are
restated next to the asserts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bigmodel.config import load_config
from bigmodel.parallel.context import setup_parallel
from bigmodel.tools.verify import format_table, run_trace, verify

TINY = str(Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml")
# 4 heads so that tp4 divides them; dropout stays 0 (the default) so every layout is deterministic.
BASE = ["--model.vision_heads=4", "--model.text_heads=4", "--log.wandb=disabled"]
STEPS = 10

# fp32: layouts differ from the reference only in summation order, a few ulps (~1e-7 relative); a real bug (a
# missing reduction, a wrong shard, a wrong negative set) moves the 10-step losses by >= 1e-3 and gradients by far
# more than 1e-6 of the largest gradient.
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-6

TWO_PROCESSES = ["dp2", "zero1x2", "zero2x2", "tp2", "tp2+sp"]
FOUR_PROCESSES = ["zero3x4", "tp4", "hsdp2x2", "dp2xtp2xzero3", "dp2xtp2", "dp2xtp2xzero1", "dp2xtp2+spxzero2"]
SUITES = {
    "cross": TWO_PROCESSES + FOUR_PROCESSES,
    "merged": ["zero2x2", "tp2+sp", "dp2xtp2xzero3"],
    "none": ["dp2", "tp2", "zero3x4"],
    "none-cpu-fused": ["dp2", "zero3x4"],  # FSDP2 gathers whole blocks, so the fused kernels run under it
    # SigLIP's ring on 4 ranks (the world size at which a reversed ring shows) with ZeRO-3, TP and PP; the gather
    # exchange and both exchanges on 2 ranks are checked at the loss level in tests/distributed/losses. Patch
    # dropout rides along (one launch for both): every layout must drop the same patches of the same samples.
    "siglip-ring": ["zero3x4", "dp2xtp2", "dp2xpp2"],
}
FUSION_OVERRIDES = {
    "cross": [],
    "merged": ["--model.fusion=merged"],
    "none": [  # CLIP's shape, quick_gelu included
        "--model.fusion=none",
        "--model.fusion_layers=0",
        "--train.loss_weights.itm=0",
        "--train.loss_weights.mlm=0",
        "--model.activation=quick_gelu",
    ],
}
FUSION_OVERRIDES["none-cpu-fused"] = [*FUSION_OVERRIDES["none"], "--model.cpu_fused_kernels=true"]
FUSION_OVERRIDES["siglip-ring"] = [
    "--train.loss_weights.contrastive=0",
    "--train.loss_weights.siglip=1",
    "--train.siglip_exchange=ring",
    "--model.patch_dropout=0.5",
]


@pytest.mark.slow
@pytest.mark.parametrize("fusion", list(SUITES))
def test_layouts_match_single_process_reference(tmp_path, fusion):
    report = verify(TINY, [*BASE, *FUSION_OVERRIDES[fusion]], SUITES[fusion], STEPS, tmp_path, LOSS_RTOL, GRAD_RTOL)
    table = format_table(report.comparisons, report.loss_rtol, report.grad_rtol)
    for comparison in report.comparisons:
        assert not comparison.missing, table
        assert comparison.max_loss_rel <= LOSS_RTOL, table
        assert comparison.max_grad_rel <= GRAD_RTOL, table
    # The reference must actually train, or equal trajectories would prove little.
    assert report.reference.losses[-1] < 0.95 * report.reference.losses[0]


@pytest.mark.slow
def test_bf16_in_a_parallel_layout_stays_close_to_fp32(tmp_path):
    fp32 = load_config(TINY, BASE)
    reference = run_trace(fp32, setup_parallel(fp32), STEPS)
    report = verify(TINY, [*BASE, "--train.precision=bf16"], ["dp2xtp2xzero3"], STEPS, tmp_path)
    bf16 = report.traces["dp2xtp2xzero3"].losses
    # bf16 autocast rounds activations to 8 mantissa bits (~4e-3 relative per op); after 10 steps the loss stays
    # within 1e-2 of fp32, while a broken bf16 path (e.g. bf16 master weights or reductions) drifts further.
    assert abs(bf16[-1] - reference.losses[-1]) / reference.losses[-1] < 1e-2
    assert report.passed, format_table(report.comparisons, report.loss_rtol, report.grad_rtol)


@pytest.mark.slow
def test_compiled_layouts_match_the_reference(tmp_path):
    # aot_eager traces and replays the same ATen ops without generating code, so it checks that compilation
    # composes with FSDP and tensor parallelism (graph breaks, hooks, DTensor tracing) without a C++ compiler.
    # The ops and their order are the ones eager runs, hence the fp32 tolerances.
    overrides = [*BASE, "--train.compile=true", "--train.compile_backend=aot_eager"]
    report = verify(TINY, overrides, ["zero3x2", "tp2"], 3, tmp_path, LOSS_RTOL, GRAD_RTOL)
    assert report.passed, format_table(report.comparisons, report.loss_rtol, report.grad_rtol)


@pytest.mark.slow
def test_zero3_keeping_gathered_parameters_matches_the_reference(tmp_path):
    # The native engine end to end (foreach AdamW over FSDP's shards) with each block's parameters kept gathered
    # from its forward to its backward. Keeping them changes which copy of the weights backward reads, not the
    # arithmetic, hence the fp32 tolerances. (The reference, one process, keeps whole parameters anyway.)
    overrides = [*BASE, "--parallel.reshard_after_forward=false"]
    report = verify(TINY, overrides, ["zero3x2", "hsdp2x2"], STEPS, tmp_path, LOSS_RTOL, GRAD_RTOL)
    assert report.passed, format_table(report.comparisons, report.loss_rtol, report.grad_rtol)


@pytest.mark.slow
def test_locked_image_tower_matches_the_reference_in_every_engine(tmp_path, monkeypatch):
    # LiT: the reference and every layout freeze the same parameters (bigmodel.models.locking), so both report
    # gradients for the trainable ones only; a frozen parameter that gets a gradient in a layout, or a trainable one
    # that gets none, is `missing` (or `zeroed`) and fails. Same arithmetic as unlocked, hence the fp32 tolerances.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    overrides = [*BASE, "--train.lock_image=true", "--deepspeed.param_persistence_threshold=0"]
    layouts = ["zero3x2", "tp2", "pp2", "ds-zero3x2"]  # one world size: one launch
    report = verify(TINY, overrides, layouts, 5, tmp_path, LOSS_RTOL, GRAD_RTOL)
    table = format_table(report.comparisons, report.loss_rtol, report.grad_rtol)
    assert report.passed, table
    assert not any(name.startswith("vision.") for name in report.reference.grads), "the image tower is frozen"
