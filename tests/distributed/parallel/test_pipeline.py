"""Pipeline layouts against the single-process reference that accumulates over the same microbatches.

Each check runs `bigmodel.tools.verify.verify` (the library behind `bigmodel verify`) with real gloo processes.
The model has 4 + 4 + 1 blocks so that 4 stages (pp4, or pp2 with 2 virtual stages per rank) each get some.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bigmodel.tools.verify import Trace, compare, format_table, verify

TINY = str(Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml")
BASE = ["--model.vision_layers=4", "--model.text_layers=4", "--log.wandb=disabled"]
STEPS = 10
# fp32: the pipeline runs the reference's operations on the same microbatches; only summation order differs (a few
# ulps, ~1e-7). A stage whose gradients are lost or a microbatch counted twice moves losses by >= 1e-3.
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-6

SUITES = {
    "cross": [
        *("pp2+gpipe", "pp2+1f1b", "pp2+interleaved", "pp2+zb"),  # 2 processes
        *("pp4+1f1b", "pp2xtp2", "pp2xdp2", "pp2xdp2xzero1", "pp2xdp2xzero2", "pp2xdp2xzero3"),  # 4 processes
        "pp2xdp2xtp2",  # 8 processes
    ],
    "merged": ["pp2+1f1b", "pp2+zb", "pp2xtp2"],
}


def assert_report(report) -> None:
    table = format_table(report.comparisons, report.loss_rtol, report.grad_rtol)
    for comparison in report.comparisons:
        assert not comparison.missing and not comparison.zeroed, table
        assert comparison.max_loss_rel <= LOSS_RTOL, table
        assert comparison.max_grad_rel <= GRAD_RTOL, table
    assert report.reference.losses[-1] < 0.95 * report.reference.losses[0], "the reference must train"


@pytest.mark.slow
@pytest.mark.parametrize("fusion", list(SUITES))
def test_pipeline_layouts_match_the_reference(tmp_path, fusion):
    overrides = [*BASE, f"--model.fusion={fusion}"]
    assert_report(verify(TINY, overrides, SUITES[fusion], STEPS, tmp_path, LOSS_RTOL, GRAD_RTOL))


def test_silently_zero_stage_gradients_fail_the_comparison():
    # The failure mode the notes warn about: a stage whose inputs did not require grad leaves its parameters'
    # gradients at zero while the losses (computed on the last stage) still look right.
    gen = torch.Generator().manual_seed(0)
    grads = {
        "vision.blocks.layers.0.mlp.fc1.weight": torch.randn(4, 4, generator=gen),
        "heads": torch.randn(3, generator=gen),
    }
    reference = Trace([2.0, 1.5], grads)
    zeroed = Trace([2.0, 1.5], grads | {"vision.blocks.layers.0.mlp.fc1.weight": torch.zeros(4, 4)})
    comparison = compare("pp2", reference, zeroed)
    assert comparison.zeroed == ["vision.blocks.layers.0.mlp.fc1.weight"]
    assert not comparison.passed(LOSS_RTOL, GRAD_RTOL)
    assert compare("pp2", reference, reference).passed(LOSS_RTOL, GRAD_RTOL)
