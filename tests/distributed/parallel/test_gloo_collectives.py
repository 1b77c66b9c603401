"""The gloo transport (parallel.gloo_transport, off by default) against the torch collectives it replaces, on real
gloo processes.

`GlooReduceScatter` and `GlooAllGather` (bigmodel/parallel/gloo/fsdp.py, over bigmodel.parallel.gloo.collectives)
stand in for gloo's reduce_scatter_tensor and all_gather_into_tensor under FSDP2 and ZeRO-1/2, and `all_reduce_sum`
for gloo's all_reduce under ZeRO-0/1 (bigmodel.parallel.data_parallel): they must give the same result
(bitwise for the gather, and for the sum where it has one order: 2 ranks), on subgroups too, through each transport
(shared memory, in one piece or in many; point-to-point messages), and `apply_fsdp` must actually use them. Where the
ranks cannot see each other's shared memory, every rank must fall back alike.
The end-to-end equivalence with the single-process reference is tests/distributed/parallel/test_zero.py's.

This file is also the worker: torchrun starts it with 4 processes (`python test_gloo_collectives.py --out F`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

WORLD = 4
# On 4 ranks the exchange sums rank 0's to rank 3's chunks in rank order and gloo's ring sums in its own
# order. Each of the two sums is off the exact one by at most 3 roundings of 2^-24 (6e-8) of the sum of the terms'
# magnitudes (what the difference is divided by), so they differ by at most 3.6e-7; measured up to 2.5e-7. A chunk
# delivered to the wrong rank or a missing 1/n is off by O(1).
FOUR_RANK_RTOL = 3.6e-7
FULL_SHM_SLOT_BYTES = 256 << 10
"""Slots in the full-tmpfs case: 512 KiB of segment a rank."""
FULL_SHM_BYTES = 1200 << 10
"""That tmpfs: room for two ranks' segments, not three."""


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    # Imported here: torchrun runs this file as a script, where the `tests` package is not importable.
    from tests.distributed.launch import run_worker

    folder = tmp_path_factory.mktemp("zero3_paths")
    # A tmpfs with room for two of the four ranks' segments (a full /dev/shm: Docker gives 64 MB). Mounting needs
    # root; without it, the test that reads this case skips.
    full = folder / "full-shm"
    full.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={FULL_SHM_BYTES // 1024}k", "tmpfs", str(full)]
    mounted = subprocess.run(mount, capture_output=True, check=False).returncode == 0
    try:
        extra = ["--full-shm", str(full)] if mounted else []
        return run_worker(WORLD, str(Path(__file__).resolve()), folder / "out.json", *extra)
    finally:
        if mounted:
            subprocess.run(["umount", str(full)], check=True)


TRANSPORTS = ["shm", "shm_pieces", "p2p"]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("op", ["sum", "avg"])
def test_reduce_scatter_is_gloos_on_two_ranks(results, transport, op):
    for rank in results:
        assert rank[transport]["pair"][op]["bitwise"], rank[transport]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("op", ["sum", "avg"])
def test_reduce_scatter_matches_gloo_on_four_ranks(results, transport, op):
    for rank in results:
        assert rank[transport]["world"][op]["max_rel"] <= FOUR_RANK_RTOL, rank[transport]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_all_reduce_is_gloos_on_two_ranks_and_close_on_four(results, transport):
    for rank in results:
        assert rank[transport]["pair"]["all_reduce"]["bitwise"], rank[transport]
        assert rank[transport]["world"]["all_reduce"]["max_rel"] <= FOUR_RANK_RTOL, rank[transport]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("group", ["pair", "world"])
def test_all_reduce_leaves_the_same_bits_on_every_rank(results, transport, group):
    for rank in results:
        assert rank[transport][group]["all_reduce"]["same_on_every_rank"], rank[transport]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("group", ["pair", "world"])
def test_all_gather_is_gloos(results, transport, group):
    for rank in results:
        assert rank[transport][group]["gather_bitwise"], rank[transport]


def test_transports_were_the_ones_named(results):
    for rank in results:
        assert rank["shm"]["pair"]["shared"] and rank["shm_pieces"]["world"]["shared"], rank
        assert rank["shm"]["world"]["slot_bytes"] == 64 << 10 and rank["shm_pieces"]["world"]["slot_bytes"] == 1024
        assert not rank["p2p"]["pair"]["shared"] and not rank["p2p"]["world"]["shared"], rank


def test_small_all_reduces_and_gathers_are_gloos_own(results):
    # 16 KB: below SMALL_ALL_REDUCE_BYTES and SMALL_ALL_GATHER_BYTES, where gloo's own is faster: the group never
    # maps shared memory, and the results are gloo's, bitwise (on 4 ranks too).
    for rank in results:
        assert rank["small"] == {"segments": False, "bitwise": True}, rank


def test_segments_are_unmapped_with_their_group(results):
    for rank in results:
        assert rank["released_with_group"], rank


def test_ranks_without_a_common_shm_fall_back_together(results):
    # Ranks 1 and 3 have no shared-memory folder (a host without /dev/shm): no rank may use shared memory (it would
    # wait for them), and the segment files that ranks 0 and 2 made are gone afterwards.
    for rank in results:
        assert rank["separate_shm"] == {"fell_back": True, "left_behind": [], "gather_bitwise": True}, rank


def test_a_full_shm_is_an_error_at_setup_and_every_rank_falls_back(results):
    if "full_shm" not in results[0]:
        pytest.skip("mounting a small tmpfs needs root")
    # Two ranks reserved their segments and two got ENOSPC when reserving (posix_fallocate), not a SIGBUS at a later
    # write into memory the tmpfs does not have (which would have killed the worker). No rank then uses shared
    # memory, the results are gloo's, and the segment files are gone.
    outcomes = sorted(rank["full_shm"]["own_segment"] for rank in results)
    assert outcomes == ["ENOSPC", "ENOSPC", "mapped", "mapped"], outcomes
    for rank in results:
        full = rank["full_shm"]
        assert not full["shared"] and full["gather_bitwise"] and full["left_behind"] == [], full


def test_fsdp_gathers_and_reduces_through_bigmodels_collectives(results):
    # Per step and unit (resharded after forward): an all-gather in forward, another in backward, one reduce-scatter.
    # The rest are the contrastive loss's gathers of the embeddings (funcol: as many as in the kept-gathered step)
    # and their backward; nothing goes point-to-point or through gloo's all-to-all.
    for rank in results:
        ours, keep = rank["zero3_step_calls"], rank["keep_gathered_step_calls"]
        assert ours["bigmodel"] == {"all_gather": 2 * rank["fsdp_units"], "reduce_scatter": rank["fsdp_units"]}, rank
        losses = ours["all"]["all_gather"] - ours["bigmodel"]["all_gather"]
        assert losses == keep["all"]["all_gather"] - keep["bigmodel"]["all_gather"] > 0, rank
        assert "p2p" not in ours["all"] and "all_to_all" not in ours["all"], rank


def test_kept_gathered_blocks_form_one_unit_per_stack(results):
    # Each stack and the root gather their parameters and reduce their gradients once per step (test_zero.py: the
    # same updates as per block).
    for rank in results:
        units = rank["block_stacks"] + 1
        assert rank["keep_gathered_step_calls"]["bigmodel"] == {"all_gather": units, "reduce_scatter": units}, rank


# ---------------------------------------------------------------------------------------------------------------
# The worker


def compare_collectives(group, seed: int) -> dict[str, Any]:
    """GlooReduceScatter against dist.reduce_scatter_tensor on `group`, for SUM and AVG, on an uneven mix of
    magnitudes (so that the order of the sum shows in the last bits), GlooAllGather against
    dist.all_gather_into_tensor, gathering in place (as FSDP2 does) and from a separate input, and
    collectives.all_reduce_sum against dist.all_reduce. max_rel: the largest
    difference over the sum of the terms' magnitudes (a difference of sums that cancel is measured against the
    terms, not the result)."""
    import torch
    import torch.distributed as dist

    from bigmodel.parallel.gloo import collectives
    from bigmodel.parallel.gloo.fsdp import GlooAllGather, GlooReduceScatter

    n = group.size()
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(n * 1001, generator=gen) * torch.logspace(-3, 3, n * 1001)
    magnitude = torch.empty(1001)
    dist.reduce_scatter_tensor(magnitude, data.abs(), op=dist.ReduceOp.SUM, group=group)
    out = {}
    for name, op, terms in (("sum", dist.ReduceOp.SUM, magnitude), ("avg", dist.ReduceOp.AVG, magnitude / n)):
        ours, gloo = torch.empty(1001), torch.empty(1001)
        GlooReduceScatter()(ours, data.clone(), group, op)
        dist.reduce_scatter_tensor(gloo, data.clone(), op=op, group=group)
        out[name] = {"bitwise": torch.equal(ours, gloo), "max_rel": ((ours - gloo).abs() / terms).max().item()}
    mine = data[:1001]
    gloo, separate, in_place = torch.empty(n * 1001), torch.empty(n * 1001), torch.zeros(n * 1001)
    dist.all_gather_into_tensor(gloo, mine, group=group)
    GlooAllGather()(separate, mine, group)
    own = in_place[group.rank() * 1001 : (group.rank() + 1) * 1001]
    own.copy_(mine)
    GlooAllGather()(in_place, own, group)
    out["gather_bitwise"] = torch.equal(separate, gloo) and torch.equal(in_place, gloo)
    summed, gloo, magnitude = data.clone(), data.clone(), data.abs()
    collectives.all_reduce_sum(summed, group)
    dist.all_reduce(gloo, group=group)
    dist.all_reduce(magnitude, group=group)
    everyone = [torch.empty_like(summed) for _ in range(n)]
    dist.all_gather(everyone, summed, group=group)
    out["all_reduce"] = {
        "bitwise": torch.equal(summed, gloo),
        "max_rel": ((summed - gloo).abs() / magnitude).max().item(),
        "same_on_every_rank": all(torch.equal(theirs, summed) for theirs in everyone),
    }
    segments = collectives._segments.get(group)
    out["shared"], out["slot_bytes"] = segments is not None, segments.slot_bytes if segments else None
    return out


def compare_transports(out_dir: str, rank: int) -> dict[str, Any]:
    """compare_collectives over a pair of ranks and over all four, through each transport (fresh groups for each,
    as the transport is chosen at a group's first collective), and HostSegments.create where the odd ranks have no
    shared-memory folder; whether a group's segments go when the group is destroyed; and that small all-reduces and
    all-gathers are gloo's own (the comparisons above lower the size limits to 0 for their 4-16 KB buffers)."""
    import gc
    import os
    import weakref

    import torch
    import torch.distributed as dist

    from bigmodel.parallel.gloo import collectives, shm

    def groups() -> dict[str, Any]:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        return {"pair": pairs[rank // 2], "world": dist.new_group(list(range(WORLD)))}

    out: dict[str, Any] = {}
    defaults = collectives.SMALL_ALL_REDUCE_BYTES, collectives.SMALL_ALL_GATHER_BYTES
    collectives.SMALL_ALL_REDUCE_BYTES = collectives.SMALL_ALL_GATHER_BYTES = 0  # these buffers are 4-16 KB
    shm.SLOT_BYTES = 64 << 10  # one piece for each collective below; 128 KiB of /dev/shm a rank and group, not 32 MiB
    out["shm"] = {name: compare_collectives(group, seed=rank) for name, group in groups().items()}
    shm.SLOT_BYTES = 1024  # 1001 floats: 4 pieces to gather, 8 or 16 to reduce-scatter
    out["shm_pieces"] = {name: compare_collectives(group, seed=rank) for name, group in groups().items()}
    shm.SLOT_BYTES = 16 << 20
    os.environ["BIGMODEL_SHM"] = "0"
    out["p2p"] = {name: compare_collectives(group, seed=rank) for name, group in groups().items()}
    del os.environ["BIGMODEL_SHM"]

    own_dir = Path(out_dir) / f"shm-{rank}"
    if rank % 2 == 0:
        own_dir.mkdir()
    shm.SHM_DIR, default_dir = own_dir, shm.SHM_DIR
    group = groups()["world"]
    fell_back = shm.HostSegments.create(group) is None
    shm.SHM_DIR = default_dir
    gathered = compare_collectives(group, seed=rank)["gather_bitwise"]  # its first collective: it looks in /dev/shm
    released = weakref.ref(collectives._segments[group])
    dist.destroy_process_group(group)
    del group
    gc.collect()
    out["released_with_group"] = released() is None

    out["separate_shm"] = {
        "fell_back": fell_back,
        "left_behind": os.listdir(own_dir) if rank % 2 == 0 else [],
        "gather_bitwise": gathered,
    }

    collectives.SMALL_ALL_REDUCE_BYTES, collectives.SMALL_ALL_GATHER_BYTES = defaults
    small, data = groups()["world"], torch.randn(4096, generator=torch.Generator().manual_seed(rank))
    summed, gloo = data.clone(), data.clone()
    collectives.all_reduce_sum(summed, small)
    dist.all_reduce(gloo, group=small)
    ours, theirs = torch.empty(WORLD * 4096), torch.empty(WORLD * 4096)
    collectives.all_gather_into(ours, data, small)
    dist.all_gather_into_tensor(theirs, data, group=small)
    out["small"] = {
        "segments": collectives._segments.get(small) is not None,
        "bitwise": torch.equal(summed, gloo) and torch.equal(ours, theirs),
    }
    return out


def full_shm(folder: str) -> dict[str, Any]:
    """compare_collectives on a fresh 4-rank group whose segments go to `folder`, a tmpfs with room for two of them:
    what each rank's reservation of its own segment gave (mapped, or the errno's name), and what is left there."""
    import errno
    import os

    import torch.distributed as dist

    from bigmodel.parallel.gloo import collectives, shm

    own = {"result": "mapped"}
    real_map = shm._map

    def recording_map(path: Path, size: int, create: bool) -> Any:
        try:
            return real_map(path, size, create)
        except OSError as err:
            if create:
                own["result"] = errno.errorcode.get(err.errno, str(err))
            raise

    defaults = shm.SHM_DIR, shm.SLOT_BYTES, collectives.SMALL_ALL_REDUCE_BYTES, collectives.SMALL_ALL_GATHER_BYTES
    shm.SHM_DIR, shm.SLOT_BYTES, shm._map = Path(folder), FULL_SHM_SLOT_BYTES, recording_map
    collectives.SMALL_ALL_REDUCE_BYTES = collectives.SMALL_ALL_GATHER_BYTES = 0  # 4-16 KB buffers: try the tmpfs
    try:
        result = compare_collectives(dist.new_group(list(range(WORLD))), seed=dist.get_rank())
    finally:
        shm.SHM_DIR, shm.SLOT_BYTES, collectives.SMALL_ALL_REDUCE_BYTES, collectives.SMALL_ALL_GATHER_BYTES = defaults
        shm._map = real_map
    dist.barrier()  # every rank has removed its own file
    return {
        "own_segment": own["result"],
        "shared": result["shared"],
        "gather_bitwise": result["gather_bitwise"],
        "left_behind": os.listdir(folder),
    }


def zero3_step_calls(out_dir: str, *overrides: str) -> tuple[dict[str, dict[str, int]], int, int]:
    """The collectives, by kind, of one native ZeRO-3 training step of the tiny model over every rank, with the gloo
    transport (all of them, as CollectiveCounter counts them, and those of bigmodel.parallel.gloo.collectives alone),
    the number of modules that FSDP wraps and the number of block stacks."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    from bigmodel.bench.distributed import TINY, CollectiveCounter
    from bigmodel.config import load_config
    from bigmodel.data import build_train_loader
    from bigmodel.engines import build_engine
    from bigmodel.parallel.context import setup_parallel
    from bigmodel.parallel.gloo import collectives
    from bigmodel.tools.verify import layout_overrides
    from bigmodel.train.loop import split_microbatches

    layout = [*layout_overrides(f"zero3x{WORLD}"), "--parallel.gloo_transport=true"]
    cfg = load_config(TINY, [f"--train.out_dir={out_dir}", *layout, *overrides])
    ctx = setup_parallel(cfg)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, ctx)
    batch = next(iter(build_train_loader(cfg, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp)))
    counter, ours = CollectiveCounter(), {}
    with counter, collectives.observe(lambda kind, _: ours.__setitem__(kind, ours.get(kind, 0) + 1)):
        engine.train_step(split_microbatches(batch, 1))
    wrapped = sum(isinstance(module, FSDPModule) for module in engine.model.modules())
    return {"all": counter.calls, "bigmodel": ours}, wrapped, len(engine.model.block_stacks())


def worker_main() -> None:
    import torch
    import torch.distributed as dist

    from bigmodel.parallel.env import exit_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--full-shm", help="a tmpfs with room for two ranks' segments (the fixture mounts it)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out_dir = str(Path(args.out).parent)
    calls, units, stacks = zero3_step_calls(out_dir)  # initialises the default group
    keep_calls, _, _ = zero3_step_calls(out_dir, "--parallel.reshard_after_forward=false")
    rank = dist.get_rank()
    mine = {
        **compare_transports(out_dir, rank),
        "zero3_step_calls": calls,
        "fsdp_units": units,
        "keep_gathered_step_calls": keep_calls,
        "block_stacks": stacks,
    }
    if args.full_shm:
        mine["full_shm"] = full_shm(args.full_shm)
    per_rank = [None] * WORLD
    dist.all_gather_object(per_rank, mine)
    if rank == 0:
        Path(args.out).write_text(json.dumps(per_rank), encoding="utf-8")
    exit_distributed(0)


if __name__ == "__main__":
    worker_main()
