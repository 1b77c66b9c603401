"""The layout planner: per-rank memory and communication of candidate layouts for a config on a GPU cluster,
ranked by an estimated step time, with the reason each rejected layout cannot run.

Everything is computed from the config: parameter counts from the model built on the meta device, FLOPs from
`bigmodel.models.flops`, model-state bytes from ZeRO's theory (`bigmodel.parallel.memory.zero_theory_bytes`),
legality from `ParallelDims.check_layout` and the config's batch checks. The activation and communication models
below follow what this code base actually saves and issues (measured on CPU at small scale:
tests/unit/tools/test_plan.py and `bigmodel bench`); the step-time estimate is a ranking heuristic, not a promise.

Units: bytes, seconds, FLOP. A "rank" is one GPU.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import torch

from bigmodel.config.errors import ConfigError
from bigmodel.config.schema import Config, ModelConfig
from bigmodel.config.validate import check_batch, check_fused_kernels
from bigmodel.losses import active_objectives
from bigmodel.models.encoder import MultimodalEncoder, image_tokens
from bigmodel.models.flops import flops_per_block, flops_per_sample
from bigmodel.parallel.dims import ParallelDims
from bigmodel.parallel.memory import zero_theory_bytes
from bigmodel.parallel.pipeline import plan_stages
from bigmodel.parallel.timeline import theoretical_bubble

FP32 = 4
BF16 = 2


@dataclass(frozen=True)
class Cluster:
    """The machines a job runs on."""

    gpus: int
    """GPUs in the job, all nodes together."""
    gpu_mem: float
    """Bytes of memory per GPU."""
    nodes: int = 1
    peak_flops: float = 989e12
    """Dense matmul peak of one GPU at the training precision (H100/H200 bf16: 989 TFLOP/s)."""
    mfu: float = 0.45
    """Share of the peak the model's matmuls are assumed to reach (for the step-time ranking only)."""
    intra_node_bw: float = 400e9
    """Bytes/s one GPU sends to the others of its node (NVLink: ~450 GB/s per direction on H100/H200)."""
    inter_node_bw: float = 45e9
    """Bytes/s one GPU sends to other nodes (one 400 Gb/s NIC per GPU, minus protocol overhead)."""
    reserved: float = 0.1
    """Share of each GPU's memory kept free for the CUDA context, the allocator's fragmentation and temporaries."""

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.nodes < 1 or self.gpus % self.nodes:
            raise ConfigError(f"--gpus {self.gpus} must be a positive multiple of --nodes {self.nodes}")
        if self.gpu_mem <= 0:
            raise ConfigError(f"--gpu-mem must be positive, got {self.gpu_mem}")

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes

    @property
    def usable_mem(self) -> float:
        return self.gpu_mem * (1 - self.reserved)


@dataclass(frozen=True)
class Layout:
    """One candidate: the parallel.* settings plus the microbatching and activation checkpointing it needs."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    zero_stage: int
    sp: bool
    microbatches: int
    """Microbatches per step: gradient accumulation, or the pipeline's microbatches."""
    activation_checkpointing: bool
    reshard_after_forward: bool = True
    """ZeRO-3: free each block's gathered parameters after its forward (False: keep them until its backward)."""

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(self.dp_replicate, self.dp_shard, self.tp, self.pp, self.sp, self.zero_stage)

    def overrides(self) -> list[str]:
        """The command-line overrides that select this layout."""
        items = [
            f"--parallel.dp_replicate={self.dp_replicate}",
            f"--parallel.dp_shard={self.dp_shard}",
            f"--parallel.tp={self.tp}",
            f"--parallel.pp={self.pp}",
            f"--parallel.zero_stage={self.zero_stage}",
        ]
        if self.sp:
            items.append("--parallel.sp=true")
        if self.pp > 1:
            items += ["--parallel.pp_schedule=1f1b", f"--parallel.microbatches={self.microbatches}"]
        elif self.microbatches > 1:
            items.append(f"--train.grad_accum={self.microbatches}")
        items.append(f"--train.activation_checkpointing={str(self.activation_checkpointing).lower()}")
        if self.zero_stage == 3 and not self.reshard_after_forward:
            items.append("--parallel.reshard_after_forward=false")
        return items

    def describe(self) -> str:
        parts = [f"dp{self.dp}" if self.dp_replicate == 1 else f"hsdp{self.dp_replicate}x{self.dp_shard}"]
        parts.append(f"zero{self.zero_stage}")
        if self.zero_stage == 3 and not self.reshard_after_forward:
            parts.append("keep")
        if self.tp > 1:
            parts.append(f"tp{self.tp}" + ("+sp" if self.sp else ""))
        if self.pp > 1:
            parts.append(f"pp{self.pp}")
        parts.append(f"mb{self.microbatches}")
        if self.activation_checkpointing:
            parts.append("ac")
        return " ".join(parts)


@dataclass
class Estimate:
    """Per-rank memory (bytes), communication (bytes sent per step) and time (seconds) of one layout."""

    layout: Layout
    memory: dict[str, float]
    """params, grads, optimizer, activations, buffers, total: the worst pipeline stage's rank."""
    comm: dict[str, float]
    """dp, tp, pp: bytes one rank sends per step (ring algorithms)."""
    time: dict[str, float]
    """compute, bubble, comm, step (seconds), and mfu: the estimate used for ranking."""
    fits: bool
    microbatch_size: int
    """Samples per microbatch per data-parallel rank."""


@dataclass
class Rejection:
    layout: Layout
    reason: str


@dataclass
class Plan:
    """The planner's answer: fitting layouts, fastest first, and every rejected one with its reason."""

    cluster: Cluster
    parameters: int
    fitting: list[Estimate] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def best(self) -> Estimate | None:
        return self.fitting[0] if self.fitting else None


# ---------------------------------------------------------------------------------------------------------------
# Parameters per rank


_BLOCK = re.compile(r"^(vision|text|fusion)\.blocks\.layers\.(\d+)\.")
# Tensor-parallel plan (bigmodel/parallel/tensor_parallel.py): these tensors are split over the tp ranks.
_TP_SHARDED = re.compile(
    r"(_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)|_attn\.out_proj\.weight|mlp\.fc1\.(weight|bias)|mlp\.fc2\.weight"
    r"|^text\.token_embedding\.weight|^(mlm|caption)_head\.decoder\.(weight|bias))$"
)
_EMBED = ("vision.patch_embedding", "vision.class_embedding", "vision.position_embedding", "vision.pre_norm",
          "text.token_embedding", "text.position_embedding")  # fmt: skip
_JOIN = ("vision.post_norm", "text.final_norm", "contrastive.", "fusion.image_proj", "fusion.modality_embedding")
_HEADS = ("itm_head", "mlm_head", "caption_head", "fusion.norm")


@dataclass(frozen=True)
class ParameterTable:
    """Parameter counts of the model by (stack, block index) for blocks and by part for the rest, each split into
    the elements tensor parallelism shards and the ones it replicates."""

    blocks: dict[tuple[str, int], tuple[int, int]]
    """(stack, index) -> (sharded, replicated) elements."""
    embed: tuple[int, int]
    join: tuple[int, int]
    heads: tuple[int, int]

    @property
    def total(self) -> int:
        parts = [*self.blocks.values(), self.embed, self.join, self.heads]
        return sum(a + b for a, b in parts)


def parameter_table(cfg: ModelConfig, objectives: Collection[str]) -> ParameterTable:
    """Count the parameters of MultimodalEncoder(cfg, objectives), built on the meta device."""
    with torch.device("meta"):
        model = MultimodalEncoder(cfg, objectives)
    blocks: dict[tuple[str, int], list[int]] = {}
    rest = {"embed": [0, 0], "join": [0, 0], "heads": [0, 0]}
    for name, param in model.named_parameters():
        slot = 0 if _TP_SHARDED.search(name) else 1
        match = _BLOCK.match(name)
        if match:
            blocks.setdefault((match[1], int(match[2])), [0, 0])[slot] += param.numel()
        else:
            part = "embed" if name.startswith(_EMBED) else "join" if name.startswith(_JOIN) else "heads"
            if part == "heads" and not name.startswith(_HEADS):
                raise ValueError(f"parameter {name} has no pipeline stage in the planner; add it to plan.py")
            rest[part][slot] += param.numel()
    return ParameterTable({k: tuple(v) for k, v in blocks.items()}, *(tuple(rest[p]) for p in rest))


@dataclass(frozen=True)
class Stage:
    """One pipeline stage (the whole model when pp = 1): its blocks and which non-block parts it holds."""

    blocks: tuple[tuple[str, int], ...]
    embed: bool
    join: bool
    heads: bool

    def parameters(self, table: ParameterTable, tp: int) -> float:
        """Elements this stage's tensor-parallel rank holds."""
        parts = [table.blocks[b] for b in self.blocks]
        parts += [p for p, on in ((table.embed, self.embed), (table.join, self.join), (table.heads, self.heads)) if on]
        return sum(sharded / tp + replicated for sharded, replicated in parts)


def stages(cfg: Config, objectives: Collection[str], pp: int) -> list[Stage]:
    """The model split into `pp` stages as the pipeline engine splits it (1f1b, one stage per rank)."""
    if pp == 1:
        table = [(s, i) for s, n in _block_counts(cfg.model, objectives).items() for i in range(n)]
        return [Stage(tuple(table), embed=True, join=True, heads=True)]
    return list(_pipeline_stages(cfg, tuple(objectives), pp))


def _pipeline_stages(cfg: Config, objectives: tuple[str, ...], pp: int) -> tuple[Stage, ...]:
    key = (repr(cfg.model), objectives, pp)
    if key not in _STAGE_CACHE:
        parallel = dataclasses.replace(cfg.parallel, pp=pp, pp_schedule="1f1b", microbatches=pp, pp_layers=[])
        plans = plan_stages(dataclasses.replace(cfg, parallel=parallel), objectives)
        _STAGE_CACHE[key] = tuple(
            Stage(
                tuple((s, i) for s in ("vision", "text", "fusion") for i in p.blocks[s]),
                embed=p.embed,
                join=p.join,
                heads=p.heads,
            )
            for p in plans
        )
    return _STAGE_CACHE[key]


_STAGE_CACHE: dict[tuple, tuple[Stage, ...]] = {}


def _block_counts(cfg: ModelConfig, objectives: Collection[str]) -> dict[str, int]:
    fused = cfg.fusion != "none" and {"itm", "mlm", "caption"} & set(objectives)
    return {"vision": cfg.vision_layers, "text": cfg.text_layers, "fusion": cfg.fusion_layers if fused else 0}


# ---------------------------------------------------------------------------------------------------------------
# Activations: bytes saved for backward, as this model's forward saves them (counted per op on CPU, torch 2.13:
# tests/unit/tools/test_plan.py compares the whole model with the saved-tensor bytes measured by autograd hooks)


@dataclass(frozen=True)
class Shapes:
    """Token counts and widths the activation and communication models need."""

    image_tokens: int
    text_tokens: int
    copies: int
    """Caption copies through the text tower (plain for contrastive/ITM, masked for MLM)."""
    rows: int
    """Fused rows per sample (ITM true and neighbour pairs, MLM)."""
    fusion_tokens: int
    context_tokens: int
    """Image tokens the cross-attention reads (0 for merged fusion)."""
    masked_tokens: float

    @classmethod
    def of(cls, cfg: Config, objectives: Collection[str]) -> Shapes:
        m = cfg.model
        image = image_tokens(m, training=True)  # the planner sizes training steps
        copies = int(bool({"contrastive", "siglip", "itm", "caption"} & set(objectives))) + int("mlm" in objectives)
        rows = 2 * int("itm" in objectives) + int("mlm" in objectives) + int("caption" in objectives)
        cross = m.fusion == "cross"
        masked = cfg.data.mlm_probability * m.context_length if "mlm" in objectives else 0.0
        return cls(
            image,
            m.context_length,
            copies,
            rows,
            m.context_length if cross else m.context_length + image,
            image if cross else 0,
            masked,
        )


def _stack_geometry(cfg: ModelConfig, shapes: Shapes, stack: str) -> tuple[int, int, int, int, int]:
    """(token rows per sample, width, mlp width, heads, context tokens) of one block of `stack`."""
    if stack == "vision":
        return shapes.image_tokens, cfg.vision_width, cfg.vision_mlp_dim, cfg.vision_heads, 0
    if stack == "text":
        return shapes.copies * shapes.text_tokens, cfg.text_width, cfg.text_mlp_dim, cfg.text_heads, 0
    return shapes.rows * shapes.fusion_tokens, cfg.text_width, cfg.text_mlp_dim, cfg.text_heads, shapes.context_tokens


def block_activation_bytes(
    cfg: ModelConfig, shapes: Shapes, stack: str, bf16: bool, tp: int = 1, sp: bool = False
) -> float:
    """Bytes one block of `stack` saves for backward per sample, on one tensor-parallel rank.

    Per token of width D (MLP width F, h heads), fp32: the block input and the residual after attention (4D each,
    fp32 also under autocast), both norms' outputs (4D each), q, k and v (12D), the attention output regrouped for
    out_proj (4D), the MLP's hidden before and after the activation (8F), the attention's log-sum-exp (4h) and the
    norms' statistics (16). Under bf16 autocast every matmul saves a bf16 copy of its input: the first norm's output
    once per projection (6D); the rest halves, and the matmul weights' bf16 copies are saved too (counted in
    `weight_cast_bytes`). quick_gelu's three autograd kernels save the hidden a third time (its sigmoid). Tensor
    parallelism splits the per-head and MLP-hidden parts; sequence parallelism also the fp32 residuals.

    With `cfg.cpu_fused_kernels` (`bigmodel.models.fused`) q, k and v cast the first norm's output once (2D), and a
    quick_gelu MLP saves its hidden twice.
    """
    tokens, d, f, h, context = _stack_geometry(cfg, shapes, stack)
    fused = cfg.cpu_fused_kernels
    residual = 4 * d / (tp if sp else 1)
    e = 2 if bf16 else 4
    hidden = 2 * e * f if fused or cfg.activation != "quick_gelu" else 3 * e * f
    if bf16:
        first_norm_casts = 2 * d if fused else 6 * d
        norms_out, split = first_norm_casts + 2 * d, (6 * d + 2 * d + hidden) / tp
    else:
        norms_out, split = 8 * d, (12 * d + 4 * d + hidden) / tp
    per_token = 2 * residual + norms_out + split + 4 * h / tp + 16
    total = tokens * per_token
    if context:  # a cross-attention block: another residual, norm, q and output per text token; k, v per image token
        total += tokens * (residual + e * d + 2 * e * d / tp + 4 * h / tp + 8)
        # bf16: k and v plus the two casts of the context; fp32: k and v (the shared context is counted per stack).
        total += shapes.rows * context * ((4 * d + 4 * d / tp) if bf16 else 8 * d / tp)
    return total


def block_parameters(cfg: ModelConfig, stack: str) -> int:
    """Matmul weights of one block of `stack` (what autocast casts to bf16), without biases and norms."""
    d, f = (cfg.vision_width, cfg.vision_mlp_dim) if stack == "vision" else (cfg.text_width, cfg.text_mlp_dim)
    attentions = 2 if stack == "fusion" and cfg.fusion == "cross" else 1
    return attentions * 4 * d * d + 2 * d * f


def other_activation_bytes(cfg: Config, shapes: Shapes, stage: Stage, bf16: bool, tp: int = 1) -> float:
    """Bytes per sample saved outside the blocks by a stage: embeddings, tower norms, fusion entry and exit, heads."""
    m = cfg.model
    e = 2 if bf16 else 4
    total = 0.0
    if stage.embed:
        total += e * m.channels * m.image_size**2  # the patch convolution's input
        total += (4 + e) * shapes.image_tokens * m.vision_width + 8 * shapes.image_tokens  # pre-norm, positions
    if stage.join:
        total += 4 * shapes.image_tokens * m.vision_width + 8 * shapes.image_tokens  # post-norm input
        total += 4 * shapes.copies * shapes.text_tokens * m.text_width  # final-norm input
        if shapes.rows:
            total += e * shapes.image_tokens * m.vision_width  # image_proj input
            if shapes.context_tokens and not bf16:
                total += 4 * shapes.rows * shapes.context_tokens * m.text_width  # the context k/v read (fp32)
    if stage.heads and shapes.rows:
        total += 4 * shapes.rows * shapes.text_tokens * m.text_width  # fusion exit norm input
        # MLM head on the masked tokens: dense, activation, norm and decoder inputs, fp32 logits and log-softmax.
        total += shapes.masked_tokens * (4 * e * m.text_width + 8 * m.vocab_size / tp)
    return total


def weight_cast_bytes(cfg: ModelConfig, stage: Stage, tp: int) -> float:
    """bf16 autocast saves a bf16 copy of every matmul weight per microbatch in flight."""
    return sum(2 * block_parameters(cfg, stack) / tp for stack, _ in stage.blocks)


def activation_bytes(
    cfg: Config,
    objectives: Collection[str],
    stage: Stage,
    microbatch: int,
    in_flight: int,
    bf16: bool,
    tp: int = 1,
    sp: bool = False,
    checkpointing: bool = False,
) -> float:
    """Peak bytes of activations one rank holds: `in_flight` microbatches of `microbatch` samples saved through
    `stage`, plus (with activation checkpointing, which keeps only each block's input) one block recomputed."""
    shapes = Shapes.of(cfg, objectives)
    per_block = {s: block_activation_bytes(cfg.model, shapes, s, bf16, tp, sp) for s in ("vision", "text", "fusion")}
    cast = weight_cast_bytes(cfg.model, stage, tp) if bf16 else 0.0
    if checkpointing:
        blocks = sum(4 * _stack_geometry(cfg.model, shapes, s)[0] * _width(cfg.model, s) for s, _ in stage.blocks)
        blocks = blocks / (tp if sp else 1)
        biggest = max((per_block[s] for s, _ in stage.blocks), default=0.0)
        recompute = microbatch * biggest
        cast = 0.0 if not bf16 else max((2 * block_parameters(cfg.model, s) / tp for s, _ in stage.blocks), default=0)
    else:
        blocks = sum(per_block[s] for s, _ in stage.blocks)
        recompute = 0.0
    per_microbatch = microbatch * (blocks + other_activation_bytes(cfg, shapes, stage, bf16, tp)) + cast
    return in_flight * per_microbatch + recompute


def _width(cfg: ModelConfig, stack: str) -> int:
    return cfg.vision_width if stack == "vision" else cfg.text_width


# ---------------------------------------------------------------------------------------------------------------
# Model state, buffers and communication per rank


def model_state_bytes(table: ParameterTable, stage: Stage, layout: Layout) -> dict[str, float]:
    """ZeRO's theory (fp32 AdamW: 4 + 4 + 8 bytes per parameter) for the rank holding `stage`."""
    shard = layout.dp_shard if layout.zero_stage > 0 else 1
    return zero_theory_bytes(round(stage.parameters(table, layout.tp)), shard, layout.zero_stage)


def buffer_bytes(cfg: ModelConfig, table: ParameterTable, stage: Stage, layout: Layout) -> float:
    """Temporary buffers of the gradient and parameter communication.

    ZeRO-3 (FSDP2): a block's gathered parameters, the next block's (prefetched) and a block's unsharded gradient
    before its reduce-scatter, fp32; with `reshard_after_forward` false every gathered parameter of the stage is
    held from the end of its forward into the backward, plus a block's gradient. ZeRO 0-2: a 25 MiB bucket
    flattened for its collective, twice (send and receive or padding).
    """
    if layout.dp == 1:
        return 0.0
    if layout.zero_stage == 3:
        biggest = max((sum(table.blocks[b]) for b in stage.blocks), default=0)
        if not layout.reshard_after_forward:
            return FP32 * (stage.parameters(table, layout.tp) + biggest / layout.tp)
        return 3 * FP32 * biggest / layout.tp
    return 2 * 25 * 2**20


def ring(nbytes: float, ranks: int, collective: str) -> float:
    """Bytes one rank sends in a ring all-reduce (2 (n-1)/n of the buffer), all-gather or reduce-scatter
    ((n-1)/n of the full buffer)."""
    if ranks <= 1:
        return 0.0
    factor = 2 * (ranks - 1) / ranks if collective == "all_reduce" else (ranks - 1) / ranks
    return factor * nbytes


def dp_comm_bytes(params: float, layout: Layout, microbatches: int) -> float:
    """Gradient and parameter traffic per step for a rank holding `params` elements (before dp sharding), fp32.

    ZeRO 0: all-reduce the gradients once per step; 1: plus all-gather the updated chunks; 2: reduce-scatter plus
    all-gather; 3 (FSDP2): per microbatch, all-gather in forward and again in backward (only in forward with
    `reshard_after_forward` false) and reduce-scatter the gradients; HSDP also all-reduces each shard's gradient
    over the replicas, per microbatch.
    """
    full = FP32 * params
    stage = layout.zero_stage
    if stage == 3:
        gathers = 2 if layout.reshard_after_forward else 1
        per_mb = gathers * ring(full, layout.dp_shard, "all_gather") + ring(full, layout.dp_shard, "reduce_scatter")
        per_mb += ring(full / layout.dp_shard, layout.dp_replicate, "all_reduce")
        return microbatches * per_mb
    n = layout.dp
    if stage == 0:
        return ring(full, n, "all_reduce")
    if stage == 1:
        return ring(full, n, "all_reduce") + ring(full, n, "all_gather")
    return ring(full, n, "reduce_scatter") + ring(full, n, "all_gather")


def loss_comm_bytes(cfg: Config, objectives: Collection[str], dp: int, microbatch: int, microbatches: int) -> float:
    """The contrastive loss gathers both embeddings over the dp ranks (all-gather forward, reduce-scatter
    backward), fp32, per microbatch."""
    if "contrastive" not in objectives:
        return 0.0
    gathered = FP32 * dp * microbatch * cfg.model.embed_dim
    return microbatches * 2 * (ring(gathered, dp, "all_gather") + ring(gathered, dp, "reduce_scatter"))


def tp_comm_bytes(cfg: Config, objectives: Collection[str], stage: Stage, layout: Layout, microbatch: int) -> float:
    """Tensor-parallel traffic per step of one rank: per block and microbatch, one all-reduce of the residual
    stream after each row-parallel layer in forward (bf16 under autocast) and one per column-parallel layer's input
    gradient in backward (q, k, v and fc1 separately, fp32); plus the vocab-parallel embedding's forward all-reduce.
    Sequence parallelism replaces each forward all-reduce by an all-gather and a reduce-scatter: the same bytes."""
    if layout.tp == 1:
        return 0.0
    shapes = Shapes.of(cfg, objectives)
    fwd_e = BF16 if cfg.train.precision == "bf16" else FP32
    total = 0.0
    for stack, _ in stage.blocks:
        tokens, d, _, _, context = _stack_geometry(cfg.model, shapes, stack)
        x = microbatch * tokens * d
        total += ring(2 * x * fwd_e, layout.tp, "all_reduce") + ring(4 * x * FP32, layout.tp, "all_reduce")
        if context:
            ctx = microbatch * shapes.rows * context * d
            total += ring(x * fwd_e + x * FP32 + 2 * ctx * FP32, layout.tp, "all_reduce")
    if stage.embed:
        total += ring(FP32 * microbatch * shapes.copies * shapes.text_tokens * cfg.model.text_width, layout.tp,
                      "all_reduce")  # fmt: skip
    return layout.microbatches * total


def pp_comm_bytes(cfg: Config, objectives: Collection[str], layout: Layout, microbatch: int) -> float:
    """Pipeline traffic per step of a middle rank: each microbatch's state forward and its gradient back, fp32
    (the residual streams of both towers before the join, the fused rows and the image context after it)."""
    if layout.pp == 1:
        return 0.0
    shapes = Shapes.of(cfg, objectives)
    m = cfg.model
    towers = shapes.image_tokens * m.vision_width + shapes.copies * shapes.text_tokens * m.text_width
    fused = shapes.rows * shapes.fusion_tokens * m.text_width + shapes.image_tokens * m.text_width
    return layout.microbatches * 2 * FP32 * microbatch * max(towers, fused) / layout.tp


# ---------------------------------------------------------------------------------------------------------------
# Candidates, estimates and the ranking


def in_flight(stage_index: int, pp: int, microbatches: int) -> int:
    """Microbatches whose activations a 1F1B stage holds at its peak: pp - index (the warm-up), at most all."""
    return min(pp - stage_index, microbatches)


def estimate(
    cfg: Config, objectives: tuple[str, ...], table: ParameterTable, cluster: Cluster, layout: Layout
) -> Estimate:
    """Memory, communication and time of `layout` (assumed legal) on `cluster`; the worst stage counts."""
    bf16 = cfg.train.precision == "bf16"
    microbatch = cfg.train.global_batch_size // (layout.dp * layout.microbatches)
    plan = stages(cfg, objectives, layout.pp)
    worst: dict[str, float] = {}
    for index, stage in enumerate(plan):
        state = model_state_bytes(table, stage, layout)
        memory = state | {
            "activations": activation_bytes(
                cfg, objectives, stage, microbatch, in_flight(index, layout.pp, layout.microbatches), bf16,
                layout.tp, layout.sp, layout.activation_checkpointing,
            ),
            "buffers": buffer_bytes(cfg.model, table, stage, layout),
        }  # fmt: skip
        memory["total"] = sum(memory.values())
        if memory["total"] > worst.get("total", -1):
            worst = memory
    heaviest = max(plan, key=lambda s: s.parameters(table, layout.tp))
    params = heaviest.parameters(table, layout.tp)
    comm = {
        "dp": dp_comm_bytes(params, layout, layout.microbatches)
        + loss_comm_bytes(cfg, objectives, layout.dp, microbatch, layout.microbatches),
        "tp": max(tp_comm_bytes(cfg, objectives, s, layout, microbatch) for s in plan),
        "pp": pp_comm_bytes(cfg, objectives, layout, microbatch),
    }
    time = step_time(cfg, objectives, cluster, layout, plan, comm)
    return Estimate(layout, worst, comm, time, worst["total"] <= cluster.usable_mem, microbatch)


def step_time(
    cfg: Config, objectives: tuple[str, ...], cluster: Cluster, layout: Layout, plan: list[Stage], comm: dict
) -> dict[str, float]:
    """A ranking estimate: the slowest stage's matmuls at `cluster.mfu` of the peak, stretched by the pipeline
    bubble, plus tensor- and pipeline-parallel traffic (on the critical path) and the data-parallel traffic that
    is not hidden (ZeRO-3's gathers overlap compute in FSDP2; ZeroOptimizer's stage 0-2 reductions run after the
    backward, so they are not)."""
    masked = cfg.data.mlm_probability * cfg.model.context_length
    model_flops = flops_per_sample(cfg.model, objectives, masked_tokens=masked)["train"] * cfg.train.global_batch_size
    shares = [sum(flops_per_block(cfg.model, objectives, s) for s, _ in stage.blocks) for stage in plan]
    share = max(shares) / sum(shares) if sum(shares) else 1.0
    recompute = 4 / 3 if layout.activation_checkpointing else 1.0
    compute = model_flops * recompute * share / (layout.dp * layout.tp) / (cluster.peak_flops * cluster.mfu)
    bubble = theoretical_bubble(layout.pp, layout.microbatches) if layout.pp > 1 else 0.0
    per_node = cluster.gpus_per_node
    dp_bw = cluster.intra_node_bw if layout.dp * layout.tp <= per_node else cluster.inter_node_bw
    pp_bw = cluster.intra_node_bw if cluster.gpus // layout.pp < per_node else cluster.inter_node_bw
    dp_time = comm["dp"] / dp_bw
    dp_exposed = max(0.0, dp_time - compute) if layout.zero_stage == 3 else dp_time
    comm_time = comm["tp"] / cluster.intra_node_bw + comm["pp"] / pp_bw + dp_exposed
    step = compute / (1 - bubble) + comm_time
    ideal = model_flops / (cluster.gpus * cluster.peak_flops)
    return {"compute": compute, "bubble": bubble, "comm": comm_time, "step": step, "mfu": ideal / step}


def structural_layouts(cluster: Cluster, max_pp: int) -> Iterator[tuple[int, int, int, int, int, bool]]:
    """(dp_replicate, dp_shard, tp, pp, zero_stage, sp) for every split of the GPUs worth considering: tp and pp
    powers of two (tp up to a node; larger tp is listed so that it can be rejected with its reason)."""
    n = cluster.gpus
    tps = [t for t in _powers_of_two(2 * cluster.gpus_per_node) if n % t == 0]
    for tp in tps:
        for pp in (p for p in _powers_of_two(n // tp) if p <= max_pp and (n // tp) % p == 0):
            dp = n // (tp * pp)
            for sp in (False, True) if tp > 1 else (False,):
                for stage in (0, 1, 2, 3):
                    yield 1, dp, tp, pp, stage, sp
                # HSDP: shard within a node, replicate across nodes.
                shard = cluster.gpus_per_node // tp
                if 1 < shard < dp and dp % shard == 0:
                    yield dp // shard, shard, tp, pp, 3, sp


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(int(math.log2(max(1, limit))) + 1)]


def check(cfg: Config, objectives: tuple[str, ...], cluster: Cluster, layout: Layout) -> str | None:
    """Why `layout` cannot run (one line), or None."""
    if layout.tp > cluster.gpus_per_node:
        return (
            f"tp={layout.tp} exceeds the {cluster.gpus_per_node} GPUs of a node (tensor-parallel traffic is per "
            "block and needs the intra-node links)"
        )
    try:
        # The layout without its pipeline (the stage split is checked from the cached stages below).
        dataclasses.replace(layout.dims, pp=1).check_layout(cfg)
        parallel = dataclasses.replace(
            cfg.parallel,
            dp_replicate=layout.dp_replicate,
            dp_shard=layout.dp_shard,
            tp=layout.tp,
            pp=layout.pp,
            sp=layout.sp,
            zero_stage=layout.zero_stage,
            microbatches=layout.microbatches if layout.pp > 1 else 1,
            pp_schedule="1f1b",
        )
        train = dataclasses.replace(cfg.train, grad_accum=1 if layout.pp > 1 else layout.microbatches)
        check_batch(dataclasses.replace(cfg, parallel=parallel, train=train))
        check_fused_kernels(dataclasses.replace(cfg, parallel=parallel))
        if layout.pp > 1:
            stages(cfg, objectives, layout.pp)
    except ConfigError as err:
        return str(err)
    return None


def microbatch_choices(cfg: Config, dp: int, pp: int) -> list[int]:
    """Microbatch counts worth trying, fewest first: divisors of the per-rank batch; with a pipeline at least
    4 x pp when possible (bubble (p-1)/(m+p-1) <= 20%), else at least pp (1F1B needs m >= p)."""
    local = cfg.train.global_batch_size // dp if cfg.train.global_batch_size % dp == 0 else 0
    counts = [m for m in range(1, local + 1) if local % m == 0]
    if pp > 1:
        preferred = [m for m in counts if m >= 4 * pp]
        counts = preferred or [m for m in counts if m >= pp]
    return counts or [1]


def plan_layouts(cfg: Config, cluster: Cluster) -> Plan:
    """Every candidate layout of `cfg` on `cluster`, estimated, ranked (fastest fitting first) or rejected."""
    objectives = active_objectives(cfg.train.loss_weights)
    table = parameter_table(cfg.model, objectives)
    blocks = sum(_block_counts(cfg.model, objectives).values())
    result = Plan(cluster, table.total)
    for dp_replicate, dp_shard, tp, pp, stage, sp in structural_layouts(cluster, max_pp=2 * blocks):
        # ZeRO-3 also without resharding after forward (half the all-gathers, the stage's parameters held whole
        # through the backward); not with a pipeline, whose stages would hold them across all microbatches.
        for reshard in (True, False) if stage == 3 and pp == 1 else (True,):
            for checkpointing in (False, True):
                result_for = _best_microbatching(
                    cfg, objectives, table, cluster, (dp_replicate, dp_shard, tp, pp, stage, sp), checkpointing, reshard
                )
                if isinstance(result_for, Estimate):
                    result.fitting.append(result_for)
                else:
                    result.rejected.append(result_for)
    result.fitting.sort(key=lambda e: (e.time["step"], e.memory["total"]))
    return result


def _best_microbatching(
    cfg: Config,
    objectives: tuple[str, ...],
    table: ParameterTable,
    cluster: Cluster,
    shape: tuple[int, int, int, int, int, bool],
    checkpointing: bool,
    reshard_after_forward: bool = True,
) -> Estimate | Rejection:
    """The first microbatch count (fewest first) with which the layout is legal and fits, or why none does."""
    dp_replicate, dp_shard, tp, pp, stage, sp = shape
    last: Estimate | None = None
    reason = None
    for m in microbatch_choices(cfg, dp_replicate * dp_shard, pp):
        layout = Layout(dp_replicate, dp_shard, tp, pp, stage, sp, m, checkpointing, reshard_after_forward)
        reason = check(cfg, objectives, cluster, layout)
        if reason is not None:
            if "tp=" in reason or "does not divide model" in reason or "pipeline stages" in reason:
                return Rejection(layout, reason)  # no microbatch count changes these
            continue
        last = estimate(cfg, objectives, table, cluster, layout)
        if last.fits:
            return last
    if last is None:
        layout = Layout(dp_replicate, dp_shard, tp, pp, stage, sp, 1, checkpointing, reshard_after_forward)
        return Rejection(layout, reason or "no batch")
    gib = 2**30
    parts = ", ".join(f"{k} {v / gib:.1f}" for k, v in last.memory.items() if k != "total")
    return Rejection(
        last.layout,
        f"does not fit: needs {last.memory['total'] / gib:.1f} GiB per GPU of {cluster.usable_mem / gib:.1f} GiB "
        f"usable even with {last.layout.microbatches} microbatches of {last.microbatch_size} ({parts} GiB)",
    )


def parse_bytes(text: str) -> float:
    """'80GB' / '80G' / '80GiB' / '80' (GB) -> bytes; GB means 10^9 (as GPU memory is sold), GiB 2^30."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(GiB|GB|G|MiB|MB|M|TB|T)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"--gpu-mem {text!r}: write a size such as 80GB or 141GiB")
    value, unit = float(match[1]), (match[2] or "GB").lower()
    scale = {"gib": 2**30, "gb": 1e9, "g": 1e9, "mib": 2**20, "mb": 1e6, "m": 1e6, "tb": 1e12, "t": 1e12}[unit]
    return value * scale


def format_plan(result: Plan, top: int = 10) -> str:
    """The ranking as text: the best layouts with memory, traffic and time, then the rejections by reason."""
    gib, gb = 2**30, 1e9
    c = result.cluster
    lines = [
        f"{result.parameters / 1e9:.2f} B parameters on {c.gpus} GPUs ({c.nodes} node(s) x {c.gpus_per_node}), "
        f"{c.gpu_mem / gb:.0f} GB each ({c.usable_mem / gib:.1f} GiB usable); "
        f"step time assumes {c.mfu:.0%} of {c.peak_flops / 1e12:.0f} TFLOP/s",
        "",
        f"{'#':>2} {'layout':<30} {'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'buffer':>7} {'total':>7}"
        f" {'dp GB':>8} {'tp GB':>8} {'pp GB':>7} {'step s':>8} {'MFU':>5}",
    ]
    for i, e in enumerate(result.fitting[:top], 1):
        m = e.memory
        lines.append(
            f"{i:>2} {e.layout.describe():<30} {m['params'] / gib:>7.2f} {m['grads'] / gib:>7.2f} "
            f"{m['optimizer'] / gib:>7.2f} {m['activations'] / gib:>7.2f} {m['buffers'] / gib:>7.2f} "
            f"{m['total'] / gib:>7.2f} {e.comm['dp'] / gb:>8.2f} {e.comm['tp'] / gb:>8.2f} {e.comm['pp'] / gb:>7.2f} "
            f"{e.time['step']:>8.3f} {e.time['mfu']:>5.2f}"
        )
    lines.append("(memory in GiB per GPU, worst pipeline stage; traffic in GB sent per GPU per step)")
    if result.best is not None:
        lines += ["", "best: " + " ".join(result.best.layout.overrides())]
    else:
        lines += ["", "no layout fits: add GPUs, or lower train.global_batch_size / the model size"]
    groups: dict[str, list[Rejection]] = {}
    for r in result.rejected:
        groups.setdefault(_reason_kind(r.reason), []).append(r)
    lines += ["", f"rejected: {len(result.rejected)} of {len(result.rejected) + len(result.fitting)} candidates"]
    for kind, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {len(items):>4} {kind}; e.g. {items[0].layout.describe()}: {items[0].reason}")
    return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    for key, kind in (
        ("does not fit", "do not fit in memory"),
        ("exceeds the", "tp larger than a node"),
        ("does not divide model", "tp does not divide heads / widths / vocabulary"),
        ("pipeline stages", "more pipeline stages than blocks"),
        ("zero_stage", "ZeRO stage incompatible with the data-parallel split"),
    ):
        if key in reason:
            return kind
    return "batch cannot be split"


def plan_to_dict(result: Plan, top: int = 10) -> dict:
    """JSON form of the plan (the best `top` layouts and every rejection)."""

    def layout(e: Layout) -> dict:
        return dataclasses.asdict(e) | {"describe": e.describe(), "overrides": e.overrides()}

    return {
        "cluster": dataclasses.asdict(result.cluster),
        "parameters": result.parameters,
        "fitting": [
            {
                "layout": layout(e.layout),
                "memory": e.memory,
                "comm": e.comm,
                "time": e.time,
                "microbatch_size": e.microbatch_size,
            }
            for e in result.fitting[:top]
        ],
        "rejected": [{"layout": layout(r.layout), "reason": r.reason} for r in result.rejected],
    }
