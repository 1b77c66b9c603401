"""The global gradient norm and clipping by it, for every layout: each gradient element is counted exactly once.

A rank holds gradients in one of these forms:

- a plain tensor, identical on every rank (replicated; ZeRO 0/1 after the gradient all-reduce, or an untouched
  parameter of a tensor-parallel model): its squares are counted as they are;
- a DTensor (tensor parallel, FSDP, or both): the local tensor is one piece of the gradient along each mesh dim
  whose placement is a shard, and a copy along each replicated dim;
- a piece of a plain or tensor-parallel gradient that the caller knows is split across some process groups (ZeRO-2
  owned chunks): a `GradPiece` naming those groups.

Every form reduces to a `GradPiece`: the local squares are summed over the groups its pieces are split across,
and never over groups that hold copies.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class GradPiece:
    """A tensor of gradient on this rank and the process groups across which it is split.

    The ranks of each group in `split_over` hold disjoint pieces (which together form the gradient, or the piece
    of the next group); ranks outside them hold copies. Every rank must describe its pieces in the same order,
    with groups of the same role in the same positions.
    """

    grad: torch.Tensor
    split_over: tuple[dist.ProcessGroup, ...] = ()


def split_groups(tensor: DTensor) -> tuple[dist.ProcessGroup, ...]:
    """The process groups of the mesh dims along which `tensor` is split (Shard or FSDP's strided shard), in mesh
    order; along the other (replicated) dims its ranks hold copies."""
    groups = []
    for dim, placement in enumerate(tensor.placements):
        if placement.is_replicate():
            continue
        if placement.is_partial():
            # Squares of partial sums do not add up to the square of their sum.
            raise ValueError("a gradient with a Partial placement must be reduced before its norm is taken")
        groups.append(tensor.device_mesh.get_group(dim))
    return tuple(groups)


def as_grad_piece(grad: torch.Tensor | GradPiece) -> GradPiece:
    """`grad` as a GradPiece: a plain tensor is a whole replicated gradient, a DTensor is its local tensor split
    over `split_groups`."""
    if isinstance(grad, GradPiece):
        return grad
    if isinstance(grad, DTensor):
        return GradPiece(grad.to_local(), split_groups(grad))
    return GradPiece(grad)


def total_grad_norm(grads: Iterable[torch.Tensor | GradPiece]) -> torch.Tensor:
    """The L2 norm of all gradients together, an fp32 scalar equal on every rank.

    A collective when any piece is split: every rank of the job must call it with the same structure of pieces.
    The per-piece squares are summed in fp64, so the result does not depend on how the gradient is split.
    """
    pieces: dict[tuple[dist.ProcessGroup, ...], list[torch.Tensor]] = {}
    for piece in map(as_grad_piece, grads):
        pieces.setdefault(piece.split_over, []).append(piece.grad)
    total = torch.zeros((), dtype=torch.float64)
    # Dict order is first appearance, the same on every rank, so the collectives line up.
    for groups, tensors in pieces.items():
        # One dispatch for all pieces (each piece's fp32 norm as torch.linalg.vector_norm computes it); squared in
        # fp64, which is exact for an fp32 value.
        norms = torch._foreach_norm(tensors, dtype=torch.float32)
        partial = torch.stack(norms).double().square().sum()
        for group in groups:
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
        total = total.to(partial.device) + partial
    return total.sqrt().float()


def clip_grad_norm_(
    grads: Iterable[torch.Tensor | GradPiece], max_norm: float, pipeline_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Scale `grads` in place by min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ does, and
    return the global norm before clipping. `max_norm` <= 0 disables clipping (only the norm is computed).

    `grads` may mix plain tensors, DTensors and GradPieces (see the module docstring); a collective like
    `total_grad_norm`. With `pipeline_group`, `grads` are this pipeline stage's and the norm covers every stage:
    the stages' squared norms are summed in one all-reduce (stages hold different kinds of gradients, so their
    per-group reductions would not line up if done together).
    """
    pieces = [as_grad_piece(g) for g in grads]
    norm = total_grad_norm(pieces)
    if pipeline_group is not None and dist.get_world_size(pipeline_group) > 1:
        squared = norm.double() ** 2
        dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=pipeline_group)
        norm = squared.sqrt().float()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for piece in pieces:
            by_device.setdefault(piece.grad.device, []).append(piece.grad)
        for device, tensors in by_device.items():
            torch._foreach_mul_(tensors, scale.to(device))
    return norm
