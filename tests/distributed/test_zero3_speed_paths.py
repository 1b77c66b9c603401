"""The faster paths of native ZeRO-3 on gloo against what they replace, on real gloo processes.

`AllToAllReduceScatter` (bigmodel/parallel/fsdp.py) stands in for gloo's reduce_scatter_tensor under FSDP2: it
must give the same result, bitwise where the sum has one order (2 ranks), and `apply_fsdp` must actually use it.
The end-to-end equivalence with the single-process reference is tests/distributed/test_zero.py's.

This file is also the worker: torchrun starts it with 4 processes (`python test_zero3_speed_paths.py --out F`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

WORLD = 4
# On 4 ranks the all-to-all sums rank 0's to rank 3's chunks in rank order and gloo's ring sums in its own
# order. Each of the two sums is off the exact one by at most 3 roundings of 2^-24 (6e-8) of the sum of the terms'
# magnitudes (what the difference is divided by), so they differ by at most 3.6e-7; measured up to 2.5e-7. A chunk
# delivered to the wrong rank or a missing 1/n is off by O(1).
FOUR_RANK_RTOL = 3.6e-7


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    # Imported here: torchrun runs this file as a script, where the `tests` package is not importable.
    from tests.distributed.launch import run_worker

    return run_worker(WORLD, str(Path(__file__).resolve()), tmp_path_factory.mktemp("zero3_paths") / "out.json")


@pytest.mark.parametrize("op", ["sum", "avg"])
def test_all_to_all_reduce_scatter_is_gloos_on_two_ranks(results, op):
    for rank in results:
        assert rank["pair"][op]["bitwise"], rank["pair"][op]


@pytest.mark.parametrize("op", ["sum", "avg"])
def test_all_to_all_reduce_scatter_matches_gloo_on_four_ranks(results, op):
    for rank in results:
        assert rank["world"][op]["max_rel"] <= FOUR_RANK_RTOL, rank["world"][op]


def test_fsdp_reduces_gradients_by_all_to_all(results):
    # One all-to-all per FSDP unit and step (the reduce-scatters that remain are the contrastive loss's backward).
    for rank in results:
        assert rank["zero3_step_calls"].get("all_to_all") == rank["fsdp_units"], rank


def test_kept_gathered_blocks_form_one_unit_per_stack(results):
    # Each stack and the root reduce their gradients once per step (test_zero.py: the same updates as per block).
    for rank in results:
        assert rank["keep_gathered_step_calls"].get("all_to_all") == rank["block_stacks"] + 1, rank


# ---------------------------------------------------------------------------------------------------------------
# The worker


def compare_reduce_scatter(group, seed: int) -> dict[str, dict]:
    """AllToAllReduceScatter against dist.reduce_scatter_tensor on `group`, for SUM and AVG, on an uneven mix of
    magnitudes (so that the order of the sum shows in the last bits). max_rel: the largest difference over the sum
    of the terms' magnitudes (a difference of sums that cancel is measured against the terms, not the result)."""
    import torch
    import torch.distributed as dist

    from bigmodel.parallel.fsdp import AllToAllReduceScatter

    n = group.size()
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(n * 1001, generator=gen) * torch.logspace(-3, 3, n * 1001)
    magnitude = torch.empty(1001)
    dist.reduce_scatter_tensor(magnitude, data.abs(), op=dist.ReduceOp.SUM, group=group)
    out = {}
    for name, op, terms in (("sum", dist.ReduceOp.SUM, magnitude), ("avg", dist.ReduceOp.AVG, magnitude / n)):
        ours, gloo = torch.empty(1001), torch.empty(1001)
        AllToAllReduceScatter()(ours, data.clone(), group, op)
        dist.reduce_scatter_tensor(gloo, data.clone(), op=op, group=group)
        out[name] = {"bitwise": torch.equal(ours, gloo), "max_rel": ((ours - gloo).abs() / terms).max().item()}
    return out


def zero3_step_calls(out_dir: str, *overrides: str) -> tuple[dict[str, int], int, int]:
    """The collectives, by kind, of one native ZeRO-3 training step of the tiny model over every rank, the number
    of modules that FSDP wraps and the number of block stacks."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    from bigmodel.bench.distributed import TINY, CollectiveCounter
    from bigmodel.config import load_config
    from bigmodel.data import build_train_loader
    from bigmodel.engines import build_engine
    from bigmodel.parallel.context import setup_parallel
    from bigmodel.parallel.verify import layout_overrides
    from bigmodel.train.loop import split_microbatches

    cfg = load_config(TINY, [f"--train.out_dir={out_dir}", *layout_overrides(f"zero3x{WORLD}"), *overrides])
    ctx = setup_parallel(cfg)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, ctx)
    batch = next(iter(build_train_loader(cfg, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp)))
    counter = CollectiveCounter()
    with counter:
        engine.train_step(split_microbatches(batch, 1))
    wrapped = sum(isinstance(module, FSDPModule) for module in engine.model.modules())
    return counter.calls, wrapped, len(engine.model.block_stacks())


def worker_main() -> None:
    import torch
    import torch.distributed as dist

    from bigmodel.parallel.env import exit_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out_dir = str(Path(args.out).parent)
    calls, units, stacks = zero3_step_calls(out_dir)  # initialises the default group
    keep_calls, _, _ = zero3_step_calls(out_dir, "--parallel.reshard_after_forward=false")
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    mine = {
        "pair": compare_reduce_scatter(pairs[rank // 2], seed=rank),
        "world": compare_reduce_scatter(dist.group.WORLD, seed=rank),
        "zero3_step_calls": calls,
        "fsdp_units": units,
        "keep_gathered_step_calls": keep_calls,
        "block_stacks": stacks,
    }
    per_rank = [None] * WORLD
    dist.all_gather_object(per_rank, mine)
    if rank == 0:
        Path(args.out).write_text(json.dumps(per_rank), encoding="utf-8")
    exit_distributed(0)


if __name__ == "__main__":
    worker_main()
