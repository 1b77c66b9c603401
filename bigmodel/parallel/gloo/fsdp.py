"""FSDP2's all-gather and reduce-scatter through the gloo transport (`bigmodel.parallel.gloo.collectives`), set on
a sharded model by `use_gloo_transport` (apply_fsdp with parallel.gloo_transport)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

# The interfaces of FSDPModule.set_custom_all_gather / set_custom_reduce_scatter; torch 2.13 exports them from no
# public module.
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from bigmodel.parallel.gloo.collectives import all_gather_into, reduce_scatter_sum


class _PlainAlloc:
    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class GlooAllGather(_PlainAlloc, AllGather):
    """FSDP2's all-gather as `all_gather_into` (shared memory or point-to-point on gloo; FSDP2's input is already
    the rank's chunk of the output). Synchronous: FSDP2 reads the output when it returns, and None tells it there
    is nothing to wait for."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> None:
        all_gather_into(output_tensor, input_tensor, group)


class GlooReduceScatter(_PlainAlloc, ReduceScatter):
    """FSDP2's reduce-scatter as `reduce_scatter_sum` (shared memory or point-to-point on gloo), then the division
    for AVG by the group size, as gloo does. Synchronous, as `GlooAllGather`."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: dist.ReduceOp,
        async_op: bool = False,
    ) -> None:
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group)
            return
        reduce_scatter_sum(output_tensor, input_tensor, group)
        if op == dist.ReduceOp.AVG:
            output_tensor.div_(group.size())


def use_gloo_transport(model: nn.Module) -> None:
    """Make every FSDP unit of `model` gather parameters and reduce-scatter gradients by the gloo transport."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(GlooAllGather())
            module.set_custom_reduce_scatter(GlooReduceScatter())
