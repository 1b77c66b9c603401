"""The all-reduce, reduce-scatter and all-gather that ZeRO issues, as one set of functions: torch's by default, the
gloo transport's (`bigmodel.parallel.gloo.collectives.TRANSPORT`) with parallel.gloo_transport."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Collectives:
    """Synchronous SUM collectives on contiguous tensors over `group`, with the signatures below."""

    all_reduce_sum: Callable[[torch.Tensor, dist.ProcessGroup], None]
    """(tensor, group): `tensor` summed over the ranks, in place."""
    reduce_scatter_sum: Callable[[torch.Tensor, torch.Tensor, dist.ProcessGroup], None]
    """(output, input, group): `output` gets the sum over ranks of this rank's chunk of `input`."""
    all_gather_into: Callable[[torch.Tensor, torch.Tensor, dist.ProcessGroup], None]
    """(output, input, group): chunk r of `output` gets rank r's `input`."""


def _all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup) -> None:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def _reduce_scatter_sum(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup) -> None:
    dist.reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=group)


def _all_gather_into(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup) -> None:
    dist.all_gather_into_tensor(output, input, group=group)


TORCH = Collectives(_all_reduce_sum, _reduce_scatter_sum, _all_gather_into)
