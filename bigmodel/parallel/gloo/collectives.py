"""All-gather, reduce-scatter and all-reduce for ZeRO and FSDP2, done faster than gloo's own where the process group
is gloo's; used only with parallel.gloo_transport (torch's collectives otherwise).

Other backends (NCCL) run the collective itself. On gloo:

- ranks that share a host exchange the data through shared memory (`bigmodel.parallel.gloo.shm`), except for small
  all-reduces and all-gathers, where gloo's own is faster (`SMALL_ALL_REDUCE_BYTES`, `SMALL_ALL_GATHER_BYTES`);
- otherwise each rank posts one receive from and one send to every other rank at once (`dist.batch_isend_irecv`),
  so every chunk travels once, straight to the rank that needs it (all-gather, reduce-scatter), or gloo runs its
  own all-reduce.

gloo's own all-gather and reduce-scatter are ring or all-reduce algorithms that move a buffer in steps; sending each
chunk once straight to its rank, or through shared memory, is faster (docs/benchmarks.md, row f). All three
functions are synchronous.

`observe` lets a counter (`bigmodel.bench.distributed.CollectiveCounter`) see these collectives as what they are,
the bytes one rank sends in the ring algorithm, whatever carries them: shared memory issues no c10d operation, and
the point-to-point messages and waits that the other paths issue are then not counted again (`inside`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from bigmodel.parallel.collectives import Collectives
from bigmodel.parallel.gloo import shm

Observer = Callable[[str, float], None]
_observers: list[Observer] = []
_state = threading.local()
# Below these sizes gloo's own collective is faster than shared memory, whose all-reduce waits for the group twice;
# a reduce-scatter through shared memory is never slower.
SMALL_ALL_REDUCE_BYTES = 1 << 20
SMALL_ALL_GATHER_BYTES = 64 << 10

# Each group's segments, unmapped when the group is destroyed and collected.
_segments: weakref.WeakKeyDictionary[dist.ProcessGroup, shm.HostSegments | None] = weakref.WeakKeyDictionary()


@contextmanager
def observe(observer: Observer) -> Iterator[None]:
    """Call `observer(kind, bytes this rank sends in the ring algorithm)` for each collective of this module while
    the context is active."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def inside() -> bool:
    """True while this thread runs one of this module's collectives (its c10d operations are its own business)."""
    return getattr(_state, "inside", False)


@contextmanager
def _collective(kind: str, sent: float) -> Iterator[None]:
    for observer in _observers:
        observer(kind, sent)
    _state.inside = True
    try:
        yield
    finally:
        _state.inside = False


def _gloo(group: dist.ProcessGroup) -> bool:
    return dist.get_backend(group) == "gloo"


def _host_segments(group: dist.ProcessGroup) -> shm.HostSegments | None:
    """The group's shared-memory segments, mapped at its first collective (collective itself), or None."""
    if not shm.enabled():
        return None
    if group not in _segments:
        _segments[group] = shm.HostSegments.create(group)
    return _segments[group]


def _exchange(group: dist.ProcessGroup, sends: dict[int, torch.Tensor], receives: dict[int, torch.Tensor]) -> None:
    """Send `sends[p]` to and receive `receives[p]` from each rank p of `group` (group ranks) at once; wait for all."""
    ops = [dist.P2POp(dist.irecv, tensor, group=group, group_peer=peer) for peer, tensor in receives.items()]
    ops += [dist.P2POp(dist.isend, tensor, group=group, group_peer=peer) for peer, tensor in sends.items()]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def all_gather_into(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup) -> None:
    """`dist.all_gather_into_tensor(output, input, group)`: chunk r of the contiguous `output` gets rank r's `input`.
    `input` may already be this rank's chunk of `output` (FSDP2 gathers in place), which saves its copy."""
    if not _gloo(group):
        dist.all_gather_into_tensor(output, input, group=group)
        return
    rank, world = group.rank(), group.size()
    nbytes = input.numel() * input.element_size()
    with _collective("all_gather", (world - 1) * nbytes):
        if nbytes < SMALL_ALL_GATHER_BYTES:
            dist.all_gather_into_tensor(output, input, group=group)
            return
        segments = _host_segments(group) if world > 1 else None
        if segments is not None:
            segments.all_gather_into(output, input)
            return
        chunks = output.view(world, -1)
        if chunks[rank].data_ptr() != input.data_ptr():
            chunks[rank].copy_(input.reshape(-1))
        others = [peer for peer in range(world) if peer != rank]
        _exchange(group, {peer: chunks[rank] for peer in others}, {peer: chunks[peer] for peer in others})


def reduce_scatter_sum(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup) -> None:
    """`dist.reduce_scatter_tensor(output, input, SUM, group)`: `output` gets the sum over ranks of this rank's chunk
    of the contiguous `input` (chunk r of each rank's `input` goes to rank r).

    The sum adds the ranks' chunks in rank order: on 2 ranks the result is bitwise gloo's (a + b is b + a); on more
    the order differs from gloo's ring, by a few ulp (tests/distributed/parallel/test_gloo_collectives.py)."""
    if not _gloo(group):
        dist.reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=group)
        return
    rank, world = group.rank(), group.size()
    chunks = input.view(world, -1)
    if world == 1:
        output.copy_(chunks[0].view_as(output))
        return
    with _collective("reduce_scatter", (world - 1) * output.numel() * output.element_size()):
        segments = _host_segments(group)
        if segments is not None:
            segments.reduce_scatter_sum(output, input)
            return
        others = [peer for peer in range(world) if peer != rank]
        received = dict(zip(others, input.new_empty(world - 1, chunks.shape[1]), strict=True))
        _exchange(group, {peer: chunks[peer] for peer in others}, received)
        terms = [chunks[rank] if peer == rank else received[peer] for peer in range(world)]
        shm.sum_in_rank_order(output.view(-1), terms)


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup) -> None:
    """`dist.all_reduce(tensor, SUM, group)` of the contiguous `tensor`, in place. Through shared memory every rank
    ends with the same bits, the ranks' values summed in rank order: on 2 ranks gloo's result, bitwise; on more, a
    few ulp from gloo's ring."""
    if not _gloo(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return
    world, nbytes = group.size(), tensor.numel() * tensor.element_size()
    with _collective("all_reduce", 2 * (world - 1) / world * nbytes):
        segments = _host_segments(group) if world > 1 and nbytes >= SMALL_ALL_REDUCE_BYTES else None
        if segments is not None:
            segments.all_reduce_sum(tensor)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


TRANSPORT = Collectives(all_reduce_sum, reduce_scatter_sum, all_gather_into)
"""This module's collectives, as ZeroOptimizer takes them with parallel.gloo_transport."""
