"""Losses across data-parallel ranks equal the whole-batch loss, in value and gradient (real gloo processes)."""

from pathlib import Path

import pytest

from tests.distributed.launch import run_worker


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_losses_equal_the_global_batch_loss(tmp_path, world):
    per_rank = run_worker(world, Path(__file__).with_name("loss_worker.py"), tmp_path / "out.json")
    assert len(per_rank) == world
    for result in per_rank:
        c, m = result["contrastive"], result["mlm"]
        # float64 inputs: the only differences are summation order over at most 16 rows, ~1e-16 relative. 1e-12
        # leaves room for that and is still 10 orders of magnitude below any real bookkeeping error (a missed
        # rank, a wrong target offset, a missing 1/world would be >= 1e-3 here).
        assert c["loss_dev"] < 1e-12
        assert c["image_grad_dev"] < 1e-12 and c["text_grad_dev"] < 1e-12
        assert c["scale_grad_dev"] < 1e-12
        assert c["grad_scale"] > 1e-3, "the reference gradient must be non-trivial for the check to mean anything"
        assert m["loss_dev"] < 1e-12 and m["grad_dev"] < 1e-12
