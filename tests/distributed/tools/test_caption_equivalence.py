"""Captioning (train.loss_weights.caption) in parallel layouts reproduces the single-process reference: the
per-row causal fusion mask, the vocab-parallel caption decoder and the caption labels as the pipeline's target."""

from __future__ import annotations

from pathlib import Path

import pytest

from bigmodel.tools.verify import format_table, verify

TINY = str(Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml")
CAPTION = [
    "--model.text_causal=true",
    "--train.loss_weights.mlm=0",
    "--train.loss_weights.caption=1",
    "--log.wandb=disabled",
]
LAYOUTS = ["dp2", "tp2", "pp2", "ds-zero2x2"]  # one world size
STEPS = 10
# fp32: the layouts differ from the reference only in summation order (verify.TOLERANCES): a few ulps, ~1e-7
# relative; a wrong causal mask, label shift or missing reduction moves the losses by >= 1e-3.
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-6


@pytest.mark.slow
def test_caption_layouts_match_single_process_reference(tmp_path: Path) -> None:
    report = verify(TINY, CAPTION, LAYOUTS, STEPS, tmp_path, LOSS_RTOL, GRAD_RTOL)
    table = format_table(report.comparisons, report.loss_rtol, report.grad_rtol)
    for comparison in report.comparisons:
        assert not comparison.missing and not comparison.zeroed, table
        assert comparison.max_loss_rel <= LOSS_RTOL, table
        assert comparison.max_grad_rel <= GRAD_RTOL, table
    assert any(name.startswith("caption_head.") for name in report.reference.grads)
    # The reference must train, or equal trajectories would prove little.
    assert report.reference.losses[-1] < 0.95 * report.reference.losses[0]
