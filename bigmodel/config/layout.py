"""The parallel layout as arithmetic: degrees, the world size they need, and the checks against the model and the
pipeline split that need no process group. `bigmodel.parallel.dims.ParallelDims` adds the device meshes."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TypeVar

from bigmodel.config.errors import ConfigError
from bigmodel.config.schema import Config, LossWeights, ModelConfig, ParallelConfig

TOWERS = ("vision", "text", "fusion")
SCHEDULES_WITH_VIRTUAL_STAGES = ("interleaved_1f1b", "zero_bubble")
LayoutT = TypeVar("LayoutT", bound="ParallelLayout")


OBJECTIVES = ("contrastive", "siglip", "itm", "mlm", "caption")
"""Every pretraining objective, in the fixed order of the model's heads and the logged loss parts."""
EMBEDDING_OBJECTIVES = ("contrastive", "siglip")
"""The objectives scored on the towers' pooled embeddings (the rest read fused text)."""


def active_objectives(weights: LossWeights) -> tuple[str, ...]:
    """The objectives with a positive weight, in a fixed order; the model builds heads for these only."""
    return tuple(name for name in OBJECTIVES if getattr(weights, name) > 0)


def stages_per_rank(cfg: Config) -> int:
    """Virtual stages per rank: parallel.pp_virtual_stages for interleaved schedules, else 1."""
    return cfg.parallel.pp_virtual_stages if cfg.parallel.pp_schedule in SCHEDULES_WITH_VIRTUAL_STAGES else 1


def block_list(cfg: ModelConfig, objectives: Collection[str]) -> list[tuple[str, int]]:
    """Every Transformer block of the model in forward order, as (stack, index)."""
    fused = cfg.fusion != "none" and {"itm", "mlm", "caption"} & set(objectives)
    fusion_layers = cfg.fusion_layers if fused else 0
    counts = {"vision": cfg.vision_layers, "text": cfg.text_layers, "fusion": fusion_layers}
    return [(stack, i) for stack in TOWERS for i in range(counts[stack])]


def check_stage_split(cfg: Config, blocks: int) -> None:
    """ConfigError (one line) if `blocks` Transformer blocks cannot be split into pp x virtual stages as asked."""
    p = cfg.parallel
    count = p.pp * stages_per_rank(cfg)
    if count > blocks:
        raise ConfigError(
            f"{count} pipeline stages (parallel.pp={p.pp} x {stages_per_rank(cfg)} per rank) need at least as many "
            f"Transformer blocks, but the model has {blocks}; lower parallel.pp or parallel.pp_virtual_stages"
        )
    sizes = list(p.pp_layers)
    if sizes and (len(sizes) != count or sum(sizes) != blocks or min(sizes) < 1):
        raise ConfigError(
            f"parallel.pp_layers={sizes} must give each of the {count} stages at least one block and "
            f"{blocks} blocks in all; fix it or leave it empty for an automatic split"
        )


def check_schedule(cfg: Config) -> None:
    """ConfigError (one line) if the schedule cannot run with these microbatches and stages."""
    p = cfg.parallel
    if p.pp_schedule in SCHEDULES_WITH_VIRTUAL_STAGES and p.pp_virtual_stages < 2:
        raise ConfigError(
            f"parallel.pp_schedule={p.pp_schedule} interleaves several stages per rank; "
            "set parallel.pp_virtual_stages >= 2 (or use 1f1b)"
        )
    if p.pp_schedule != "gpipe" and p.microbatches < p.pp:
        raise ConfigError(
            f"parallel.pp_schedule={p.pp_schedule} needs parallel.microbatches >= parallel.pp={p.pp}, got "
            f"{p.microbatches}; raise parallel.microbatches"
        )
    if p.pp_schedule in SCHEDULES_WITH_VIRTUAL_STAGES and p.microbatches % p.pp:
        raise ConfigError(
            f"parallel.pp_schedule={p.pp_schedule} runs microbatches in rounds of parallel.pp={p.pp}; make "
            f"parallel.microbatches={p.microbatches} a multiple of {p.pp}"
        )


def dp_shard_for(p: ParallelConfig, world_size: int) -> int:
    """parallel.dp_shard=-1 resolved: the processes of `world_size` that dp_replicate x tp x pp leave; ConfigError
    (one line) where they leave no whole number. An explicit dp_shard is returned as it is."""
    if p.dp_shard != -1:
        return p.dp_shard
    others = p.dp_replicate * p.tp * p.pp
    if world_size % others:
        raise ConfigError(
            f"parallel.dp_shard=-1 takes the processes that parallel.dp_replicate={p.dp_replicate} x tp={p.tp} x "
            f"pp={p.pp} = {others} leave, but {world_size} processes are not a multiple of {others}; start a "
            f"multiple of {others} processes or change those degrees"
        )
    return world_size // others


@dataclass(frozen=True)
class ParallelLayout:
    """dp_replicate x dp_shard x tp x pp processes. `dp` (= dp_replicate * dp_shard) ranks see different data."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    sp: bool = False
    zero_stage: int = 0

    @classmethod
    def from_config(cls: type[LayoutT], cfg: Config) -> LayoutT:
        """The layout of `cfg` (resolve parallel.dp_shard=-1 first: `bigmodel.config.validate.resolve_dp_shard`)."""
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
            others = self.dp_replicate * self.tp * self.pp
            fits = "" if world_size % others else ", or set parallel.dp_shard=-1 (whatever the other axes leave)"
            raise ConfigError(
                f"the layout parallel.dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x tp={self.tp} x "
                f"pp={self.pp} needs {self.world_size} processes but {world_size} were started; change the layout "
                f"or start {self.world_size} processes{fits}"
            )
        self.check_layout(cfg)

    def check_layout(self, cfg: Config) -> None:
        """Raise ConfigError (one line) if the layout cannot work for this model, whatever the world size."""
        self._check_tensor_parallel(cfg)
        if self.dp_replicate > 1 and self.zero_stage in (1, 2):
            raise ConfigError(
                f"parallel.zero_stage={self.zero_stage} shards over parallel.dp_shard only; set dp_shard to the "
                "data-parallel size and dp_replicate=1, or use zero_stage 3 for HSDP"
            )
        if self.dp_replicate > 1 and self.zero_stage == 3 and self.dp_shard == 1:
            raise ConfigError("HSDP needs parallel.dp_shard > 1; with dp_shard=1 use zero_stage 0 for plain replicas")
        if self.pp > 1:
            check_schedule(cfg)
            check_stage_split(cfg, len(block_list(cfg.model, active_objectives(cfg.train.loss_weights))))
        t = cfg.train
        if t.loss_weights.siglip > 0 and t.siglip_exchange == "ring" and self.dp == 1:
            raise ConfigError(
                "train.siglip_exchange=ring passes texts around the data-parallel ranks, but this layout has one "
                "(parallel.dp_replicate x dp_shard = 1); set train.siglip_exchange=gather (on one rank both are the "
                "local loss) or start more data-parallel ranks"
            )
        if self.zero_stage > 0 and self.dp == 1:
            raise ConfigError(
                f"parallel.zero_stage={self.zero_stage} shards over data-parallel ranks, but there is only one; "
                "set parallel.dp_shard > 1 or zero_stage=0"
            )

    def _check_tensor_parallel(self, cfg: Config) -> None:
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
