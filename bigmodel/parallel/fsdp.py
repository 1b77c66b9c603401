"""ZeRO stage 3: FSDP2 (`torch.distributed.fsdp.fully_shard`) over the data-parallel mesh.

Parameters, gradients and AdamW state are sharded; each Transformer block is one FSDP unit (its parameters are
gathered just before it runs and freed after), the root unit holds the rest (embeddings, norms, heads). Mixed
precision is bf16 autocast in every layout, so no MixedPrecisionPolicy: parameters, gradient reductions and
optimizer state stay fp32. The optimizer is `bigmodel.train.optim.build_optimizer` over the resulting DTensor
parameters, switched to foreach (NativeEngine: per-tensor DTensor dispatch dominates AdamW on shards); clip with
`bigmodel.parallel.grad_norm.clip_grad_norm_` over their gradients.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` in place with FSDP2 over `mesh` (`Meshes.fsdp`) and return it.

    `mesh` is 1-D (FSDP) or 2-D (dp_replicate, dp_shard): HSDP, which shards within dp_shard and replicates across
    dp_replicate. A 2-D mesh with dp_replicate = 1 is reduced to its dp_shard dim: FSDP2 also runs on the 2-D mesh
    (measured: identical gradients and memory), but 1-D gives plain FSDP parameters with one placement each and no
    all-reduce over a group of one. Every block of every `model.block_stacks()` becomes its own unit, then the root
    takes the remaining parameters (embeddings, norms, heads). Apply after tensor parallelism: DTensor parameters on
    a tp mesh of the same world mesh are sharded over (mesh, tp). `reshard_after_forward=False`
    (`parallel.reshard_after_forward`) keeps each block's gathered parameters from its forward to its backward (the
    whole unsharded model in between, one all-gather fewer per block and step). Every rank of `mesh` calls this.
    """
    if mesh.ndim == 2 and mesh.size(0) == 1:
        mesh = mesh[mesh.mesh_dim_names[1]]
    for stack in model.block_stacks():
        for block in stack.layers.values():
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model
