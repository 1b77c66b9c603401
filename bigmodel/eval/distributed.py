"""Splitting an embedding pass over the ranks of a group so that every rank ends with one process's result.

The batches are the ones a single process would run (consecutive `batch_size` slices in dataset order), so each
embedding is computed from the same inputs as in one process; rank r runs batches r, r + W, r + 2W, ... and every
rank receives all of them back in order. A rank with no batch (more ranks than batches) still joins the exchange, so
no rank count deadlocks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def embed_in_batches(
    count: int,
    batch_size: int,
    embed: Callable[[range], torch.Tensor],
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """torch.cat of embed(range) over the batches of `count` items, (count, E), on every rank of `group` (None:
    this process alone). Every rank of `group` must call it with the same count and batch_size."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    batches = [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    mine = {b: embed(batches[b]) for b in range(rank, len(batches), world)}
    if world > 1:
        gathered: list[dict[int, torch.Tensor] | None] = [None] * world
        dist.all_gather_object(gathered, mine, group=group)
        mine = {b: tensor for part in gathered for b, tensor in part.items()}
    return torch.cat([mine[b] for b in range(len(batches))])
