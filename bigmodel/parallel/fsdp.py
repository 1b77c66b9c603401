"""ZeRO stage 3: FSDP2 (`torch.distributed.fsdp.fully_shard`) over the data-parallel mesh.

Parameters, gradients and AdamW state are sharded; each Transformer block is one FSDP unit (its parameters are
gathered just before it runs and freed after; on gloo with parameters kept gathered, each block stack: see
`apply_fsdp`), the root unit holds the rest (embeddings, norms, heads). Mixed
precision is bf16 autocast in every layout, so no MixedPrecisionPolicy: parameters, gradient reductions and
optimizer state stay fp32. The optimizer is `bigmodel.optim.build_optimizer` over the resulting DTensor
parameters, switched to foreach (NativeEngine: per-tensor DTensor dispatch dominates AdamW on shards); clip with
`bigmodel.parallel.grad_norm.clip_grad_norm_` over their gradients. Over gloo, parameters are all-gathered by
`GlooAllGather` and gradients reduce-scattered by `GlooReduceScatter` (`bigmodel.parallel.gloo.collectives`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

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


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` in place with FSDP2 over `mesh` (`Meshes.fsdp`) and return it.

    `mesh` is 1-D (FSDP) or 2-D (dp_replicate, dp_shard): HSDP, which shards within dp_shard and replicates across
    dp_replicate. A 2-D mesh with dp_replicate = 1 is reduced to its dp_shard dim: FSDP2 also runs on the 2-D mesh
    (measured: identical gradients and memory), but 1-D gives plain FSDP parameters with one placement each and no
    all-reduce over a group of one. Every block of every `model.block_stacks()` becomes its own unit (on gloo, see
    below), then the root takes the remaining parameters (embeddings, norms, heads). Apply after tensor
    parallelism: DTensor parameters on a tp mesh of the same world mesh are sharded over (mesh, tp).
    `reshard_after_forward=False` (`parallel.reshard_after_forward`) keeps each block's gathered parameters from its
    forward to its backward (the whole unsharded model in between, one all-gather fewer per block and step). Every
    rank of `mesh` calls this.

    Over gloo, FSDP2 waits for each collective as soon as it is issued (there is no stream to overlap it with), so
    a unit buys memory, never overlap, and costs a collective and a synchronisation of the ranks. Kept gathered, a
    block's unit no longer saves parameter memory, so there each block stack is one unit: one all-gather and one
    reduce-scatter per stack instead of per block, and a stack's unsharded gradients wait for the end of its
    backward. Parameters and gradients move by `GlooAllGather` and `GlooReduceScatter`. Each parameter is sharded
    the same way whatever the units, so parameters and updates are too.
    """
    if mesh.ndim == 2 and mesh.size(0) == 1:
        mesh = mesh[mesh.mesh_dim_names[1]]
    gloo = dist.get_backend(mesh.get_group(mesh.ndim - 1)) == "gloo"  # the last dim is the one FSDP shards over
    for stack in model.block_stacks():
        blocks = list(stack.layers.values())
        units = [blocks] if gloo and not reshard_after_forward and blocks else blocks
        for unit in units:
            fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    if gloo:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_custom_all_gather(GlooAllGather())
                module.set_custom_reduce_scatter(GlooReduceScatter())
    return model
