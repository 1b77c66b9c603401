"""ZeRO stage 3: FSDP2 (`torch.distributed.fsdp.fully_shard`) over the data-parallel mesh.

Parameters, gradients and AdamW state are sharded; each Transformer block is one FSDP unit (its parameters are
gathered just before it runs and freed after; with the gloo transport and parameters kept gathered, each block
stack: see `apply_fsdp`), the root unit holds the rest (embeddings, norms, heads). Mixed
precision is bf16 autocast in every layout, so no MixedPrecisionPolicy: parameters, gradient reductions and
optimizer state stay fp32. The optimizer is `bigmodel.optim.build_optimizer` over the resulting DTensor
parameters, switched to foreach (NativeEngine: per-tensor DTensor dispatch dominates AdamW on shards); clip with
`bigmodel.parallel.grad_norm.clip_grad_norm_` over their gradients. FSDP2 runs its own collectives; with
parallel.gloo_transport on a gloo mesh it runs those of `bigmodel.parallel.gloo` instead (`use_gloo_transport`).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from bigmodel.parallel.gloo.fsdp import use_gloo_transport


def apply_fsdp(
    model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True, gloo_transport: bool = False
) -> nn.Module:
    """Shard `model` in place with FSDP2 over `mesh` (`Meshes.fsdp`) and return it.

    `mesh` is 1-D (FSDP) or 2-D (dp_replicate, dp_shard): HSDP, which shards within dp_shard and replicates across
    dp_replicate. A 2-D mesh with dp_replicate = 1 is reduced to its dp_shard dim: FSDP2 also runs on the 2-D mesh
    (measured: identical gradients and memory), but 1-D gives plain FSDP parameters with one placement each and no
    all-reduce over a group of one. Every block of every `model.block_stacks()` becomes its own unit (with the gloo
    transport, see below), then the root takes the remaining parameters (embeddings, norms, heads). Apply after tensor
    parallelism: DTensor parameters on a tp mesh of the same world mesh are sharded over (mesh, tp).
    `reshard_after_forward=False` (`parallel.reshard_after_forward`) keeps each block's gathered parameters from its
    forward to its backward (the whole unsharded model in between, one all-gather fewer per block and step). Every
    rank of `mesh` calls this.

    `gloo_transport` (parallel.gloo_transport), on a gloo mesh: parameters and gradients move by
    `bigmodel.parallel.gloo.fsdp`'s all-gather and reduce-scatter, and kept gathered, each block stack is one unit.
    Over gloo, FSDP2 waits for each collective as soon as it is issued (there is no stream to overlap it with), so
    a unit buys memory, never overlap, and costs a collective and a synchronisation of the ranks; a kept-gathered
    block's unit saves no parameter memory, so one unit per stack gives one all-gather and one reduce-scatter per
    stack instead of per block. Each parameter is sharded the same way whatever the units, so updates are too.
    """
    if mesh.ndim == 2 and mesh.size(0) == 1:
        mesh = mesh[mesh.mesh_dim_names[1]]
    # The last dim is the one FSDP shards over.
    gloo = gloo_transport and dist.get_backend(mesh.get_group(mesh.ndim - 1)) == "gloo"
    for stack in model.block_stacks():
        blocks = list(stack.layers.values())
        units = [blocks] if gloo and not reshard_after_forward and blocks else blocks
        for unit in units:
            fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    if gloo:
        use_gloo_transport(model)
    return model
