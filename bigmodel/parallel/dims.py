"""ParallelDims: the layout of a job, checked against the world size and the model before any process-group work,
and the named device meshes built from it."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from bigmodel.config.layout import ParallelLayout


@dataclass(frozen=True)
class ParallelDims(ParallelLayout):
    """The layout's arithmetic and checks (`bigmodel.config.layout.ParallelLayout`) and the device meshes built
    from it."""

    def build_meshes(self, device_type: str) -> Meshes:
        """The world mesh with dims ("pp", "dp_replicate", "dp_shard", "tp"), size-1 dims included, and its named
        sub-meshes. Every process of the job must call this (it creates process groups)."""
        world = init_device_mesh(
            device_type,
            (self.pp, self.dp_replicate, self.dp_shard, self.tp),
            mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"),
        )
        fsdp = world["dp_replicate", "dp_shard"]
        return Meshes(world=world, dp=fsdp._flatten("dp"), fsdp=fsdp, tp=world["tp"], pp=world["pp"])


@dataclass(frozen=True)
class Meshes:
    """The device meshes a job uses, by role."""

    world: DeviceMesh
    dp: DeviceMesh
    """All data-parallel ranks (dp_replicate x dp_shard flattened): they see different samples."""
    fsdp: DeviceMesh
    """(dp_replicate, dp_shard): the 2-D mesh FSDP2 shards over (HSDP when dp_replicate > 1)."""
    tp: DeviceMesh
    """Tensor-parallel ranks: they hold shards of the same layers and see the same samples."""
    pp: DeviceMesh
    """Pipeline ranks: each holds different stages of the model; they see the same samples."""
