"""ParallelDims: the layout of a job, checked against the world size and the model before any process-group work,
and the named device meshes built from it."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from bigmodel.config.errors import ConfigError
from bigmodel.config.schema import Config


@dataclass(frozen=True)
class ParallelDims:
    """dp_replicate x dp_shard x tp x pp processes. `dp` (= dp_replicate * dp_shard) ranks see different data."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    sp: bool = False
    zero_stage: int = 0

    @classmethod
    def from_config(cls, cfg: Config) -> ParallelDims:
        p = cfg.parallel
        return cls(p.dp_replicate, p.dp_shard, p.tp, p.pp, p.sp, p.zero_stage)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def validate(self, world_size: int, cfg: Config) -> None:
        """Raise ConfigError (one line) if the layout does not fit `world_size` processes or the model."""
        if self.world_size != world_size:
            raise ConfigError(
                f"the layout parallel.dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x tp={self.tp} x "
                f"pp={self.pp} needs {self.world_size} processes but {world_size} were started; change the layout "
                f"or start {self.world_size} processes"
            )
        self.check_layout(cfg)

    def check_layout(self, cfg: Config) -> None:
        """Raise ConfigError (one line) if the layout cannot work for this model, whatever the world size."""
        m = cfg.model
        if self.tp > 1:
            divisible = {
                "model.vision_heads": m.vision_heads,
                "model.text_heads": m.text_heads,
                "model.vision_mlp_dim": m.vision_mlp_dim,
                "model.text_mlp_dim": m.text_mlp_dim,
                "model.vocab_size": m.vocab_size,
            }
            for name, value in divisible.items():
                if value % self.tp:
                    raise ConfigError(
                        f"parallel.tp={self.tp} does not divide {name}={value}; choose a tp that divides it "
                        f"(or change {name})"
                    )
        if self.tp > 1 and cfg.train.compile and cfg.train.compile_backend == "inductor":
            # Measured with torch 2.13: per-block compile fails in backward with DTensor inputs, and whole-model
            # inductor compile of this model fails in code generation ("mul expected 2 arguments, got 3").
            raise ConfigError(
                "train.compile with the inductor backend fails under tensor parallelism in torch 2.13; set "
                "train.compile=false, or train.compile_backend=aot_eager, or parallel.tp=1"
            )
        if self.sp and self.tp == 1:
            raise ConfigError(
                "parallel.sp=true shards sequences across tensor-parallel ranks; it needs parallel.tp > 1"
            )
        if self.dp_replicate > 1 and self.zero_stage in (1, 2):
            raise ConfigError(
                f"parallel.zero_stage={self.zero_stage} shards over parallel.dp_shard only; set dp_shard to the "
                "data-parallel size and dp_replicate=1, or use zero_stage 3 for HSDP"
            )
        if self.dp_replicate > 1 and self.zero_stage == 3 and self.dp_shard == 1:
            raise ConfigError("HSDP needs parallel.dp_shard > 1; with dp_shard=1 use zero_stage 0 for plain replicas")
        if self.pp > 1:
            # Imported here: the pipeline module imports the model, which plain layout checks do not need.
            from bigmodel.losses import active_objectives
            from bigmodel.parallel.pipeline import check_schedule, plan_stages

            check_schedule(cfg)
            plan_stages(cfg, active_objectives(cfg.train.loss_weights))
        if self.zero_stage > 0 and self.dp == 1:
            raise ConfigError(
                f"parallel.zero_stage={self.zero_stage} shards over data-parallel ranks, but there is only one; "
                "set parallel.dp_shard > 1 or zero_stage=0"
            )

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
