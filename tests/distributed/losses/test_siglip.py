"""The sigmoid loss across ranks, both exchanges, equals the whole-batch loss in value and gradient (real gloo
processes), and each rank builds only the logits blocks its exchange promises."""

from pathlib import Path

import pytest

from tests.distributed.launch import run_worker

B_LOCAL = 4  # siglip_worker.B_LOCAL


@pytest.mark.parametrize("world", [2, 4])
def test_siglip_across_ranks_equals_the_global_batch_loss(tmp_path, world):
    per_rank = run_worker(world, Path(__file__).with_name("siglip_worker.py"), tmp_path / "out.json")
    assert len(per_rank) == world
    for result in per_rank:
        for exchange in ("gather", "ring"):
            r = result[exchange]
            # fp32; the distributed sums run in another order (per block, then over ranks) than the single-process
            # one: at most 16 x 16 terms of size <= ~10, ~1e-7 relative of rounding. 1e-6 leaves room for that; a
            # missed rank, a wrong positive offset or a missing 1/W is off by >= 1e-2 here.
            assert r["loss_dev"] < 1e-6, exchange
            assert r["image_grad_dev"] < 1e-6 and r["text_grad_dev"] < 1e-6, exchange
            assert r["scale_grad_dev"] < 1e-6 and r["bias_grad_dev"] < 1e-6, exchange
            assert r["grad_scale"] > 1e-3, "the reference gradient must be non-trivial for the check to mean anything"
        gather, ring = result["gather"]["blocks"], result["ring"]["blocks"]
        # gather: one (b, B) block and nothing built in backward; ring: one (b, b) block per rank, and in backward
        # all W again, the local one too (recomputed one at a time instead of kept).
        assert gather == {"forward": [[B_LOCAL, B_LOCAL * world]], "backward": []}
        assert ring == {"forward": [[B_LOCAL, B_LOCAL]] * world, "backward": [[B_LOCAL, B_LOCAL]] * world}
        # The same check sees a ring whose backward leaves gradients on the rank that used them: text rows then
        # miss their other ranks' terms.
        assert result["broken_ring"]["text_grad_dev"] > 1e-2
