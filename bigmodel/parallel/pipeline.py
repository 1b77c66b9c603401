"""Pipeline parallelism for the multimodal encoder: the stage split, stage modules and schedules.

The model's forward is a chain of parts (see MultimodalEncoder): embed -> image-tower blocks -> text-tower blocks ->
join -> fusion blocks -> heads. A pipeline stage runs a contiguous range of the blocks, in that order; the first
stage also embeds, the stage with the last text-tower block also joins the towers (contrastive embeddings, fusion
inputs), and the last stage runs the heads. Both streams travel between stages as one tuple of tensors (image and
text tokens, and the masks later parts need), so a stage boundary may fall anywhere: inside the image tower (the text
tokens ride along), between the towers, or inside the fusion stack.

A stage module is the MultimodalEncoder with every part other stages run deleted, so its parameter names are the
unsplit model's: checkpoints do not depend on the layout, and every layout initialises the same weights.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from bigmodel.config.layout import (
    TOWERS,
    block_list,
    check_stage_split,
    stages_per_rank,
)
from bigmodel.config.schema import Config, ModelConfig
from bigmodel.models.encoder import MultimodalEncoder
from bigmodel.models.flops import flops_per_block

INPUT_KEYS = ("pixel_values", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels")
"""What the first stage receives: the batch, chunked into microbatches by the schedule (in training under patch
dropout also patch_keep, see PipelineStageModel.input_keys)."""
TOWER_KEYS = ("image", "text", "mask", "same", "selected")
"""The state between stages before the join (those present for the model's objectives, in this order)."""
JOINED_KEYS = (
    "image_embeds",
    "text_embeds",
    "logit_scale",
    "logit_bias",
    "fused",
    "fused_mask",
    "context",
    "causal",
    "mask",
    "same",
    "selected",
)
"""The state between stages after the join."""
OUTPUT_KEYS = (
    "image_embeds",
    "text_embeds",
    "logit_scale",
    "logit_bias",
    "itm_logits",
    "itm_labels",
    "mlm_logits",
    "caption_logits",
)
"""What the last stage returns to the loss."""


@dataclass(frozen=True)
class StagePlan:
    """The parts of the forward chain one pipeline stage runs."""

    index: int
    blocks: dict[str, range]
    """Block indices per stack ("vision", "text", "fusion"), each a possibly empty range."""
    embed: bool
    join: bool
    heads: bool
    after_join: bool
    """An earlier stage joined the towers: this stage receives the joined state."""

    def describe(self) -> str:
        parts = ["embed"] if self.embed else []
        parts += [f"{name}[{r.start}:{r.stop}]" for name, r in self.blocks.items() if len(r)]
        parts += [name for name, on in (("join", self.join), ("heads", self.heads)) if on]
        return f"stage {self.index}: " + " ".join(parts)


def balanced_split(costs: list[float], parts: int) -> list[int]:
    """Sizes of `parts` contiguous, non-empty groups of `costs` whose largest sum is as small as possible."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[k][i]: smallest possible largest group sum when the first i items form k groups.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    sizes, i = [], n
    for k in range(parts, 0, -1):
        sizes.append(i - cut[k][i])
        i = cut[k][i]
    return sizes[::-1]


def plan_stages(cfg: Config, objectives: Collection[str]) -> list[StagePlan]:
    """The split of the model into pp x virtual stages; ConfigError (one line) if it cannot be split so."""
    blocks = block_list(cfg.model, objectives)
    check_stage_split(cfg, len(blocks))
    if cfg.parallel.pp_layers:
        sizes = list(cfg.parallel.pp_layers)
    else:
        costs = [flops_per_block(cfg.model, objectives, stack) for stack, _ in blocks]
        sizes = balanced_split(costs, cfg.parallel.pp * stages_per_rank(cfg))
    return _stage_plans(blocks, sizes)


def _stage_plans(blocks: list[tuple[str, int]], sizes: list[int]) -> list[StagePlan]:
    plans, start, joined = [], 0, False
    last_text = max(i for i, (stack, _) in enumerate(blocks) if stack != "fusion")
    for index, size in enumerate(sizes):
        mine = blocks[start : start + size]
        ranges = {}
        for stack in TOWERS:
            ids = [i for s, i in mine if s == stack]
            ranges[stack] = range(ids[0], ids[-1] + 1) if ids else range(0)
        join = start <= last_text < start + size
        last = index == len(sizes) - 1
        plans.append(StagePlan(index, ranges, embed=index == 0, join=join, heads=last, after_join=joined))
        joined = joined or join
        start += size
    return plans


class PipelineStageModel(MultimodalEncoder):
    """The MultimodalEncoder pruned to one stage's parts, with a forward over the tuple of tensors that travels
    between stages. Parameter names are those of the unsplit model."""

    def __init__(self, cfg: ModelConfig, objectives: Collection[str], plan: StagePlan):
        super().__init__(cfg, objectives)
        self.plan = plan
        self.every_position = True  # stage outputs must not change shape with the data
        self._prune(plan)

    def _prune(self, plan: StagePlan) -> None:
        """Delete every module and parameter another stage runs."""
        stacks = {"vision": self.vision.blocks, "text": self.text.blocks}
        if self.fuses:
            stacks["fusion"] = self.fusion.blocks
        for name, stack in stacks.items():
            for key in list(stack.layers.keys()):
                if int(key) not in plan.blocks[name]:
                    del stack.layers[key]
        if not plan.embed:
            for name in ("patch_embedding", "class_embedding", "position_embedding", "pre_norm"):
                delattr(self.vision, name)
            for name in ("token_embedding", "position_embedding"):
                delattr(self.text, name)
        if not plan.join:
            del self.vision.post_norm, self.text.final_norm
            if hasattr(self, "contrastive"):
                del self.contrastive
            if self.fuses:
                del self.fusion.image_proj
                if hasattr(self.fusion, "modality_embedding"):
                    del self.fusion.modality_embedding
        if not plan.heads:
            for name in ("itm_head", "mlm_head", "caption_head"):
                if hasattr(self, name):
                    delattr(self, name)
            if self.fuses:
                del self.fusion.norm

    def input_keys(self) -> tuple[str, ...]:
        """Names of the tensors this stage receives, in order."""
        if self.plan.embed:
            # Patch dropout's keep sets exist in training batches only; evaluation sees every patch.
            return INPUT_KEYS + (("patch_keep",) if self.training and self.cfg.patch_dropout > 0 else ())
        return self._present(JOINED_KEYS if self.plan.after_join else TOWER_KEYS)

    def output_keys(self) -> tuple[str, ...]:
        """Names of the tensors this stage sends on (or, for the last stage, hands to the loss), in order."""
        if self.plan.heads:
            return self._present(OUTPUT_KEYS)
        return self._present(JOINED_KEYS if self.plan.after_join or self.plan.join else TOWER_KEYS)

    def _present(self, keys: tuple[str, ...]) -> tuple[str, ...]:
        """The keys of `keys` that exist for this model's objectives and fusion kind."""
        has = {
            "image": True, "text": True, "mask": True,
            "same": "itm" in self.objectives, "selected": "mlm" in self.objectives,
            "image_embeds": self.embeds, "text_embeds": self.embeds, "logit_scale": self.embeds,
            "logit_bias": "siglip" in self.objectives,
            "fused": self.fuses, "fused_mask": self.fuses, "context": self.fuses and self.cfg.fusion == "cross",
            "causal": "caption" in self.objectives,
            "itm_logits": "itm" in self.objectives, "itm_labels": "itm" in self.objectives,
            "mlm_logits": "mlm" in self.objectives, "caption_logits": "caption" in self.objectives,
        }  # fmt: skip
        return tuple(k for k in keys if has[k])

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = dict(zip(self.input_keys(), inputs, strict=True))
        if self.plan.embed:
            state = self.embed(state)
        if len(self.plan.blocks["vision"]):
            state = self.run_vision_blocks(state)
        if len(self.plan.blocks["text"]):
            state = self.run_text_blocks(state)
        if self.plan.join:
            state = self.join(state)
        if len(self.plan.blocks["fusion"]):
            state = self.run_fusion_blocks(state)
        if self.plan.heads:
            state = self.heads(state)
        # The schedule frees every output in place after its backward, which views do not allow: clone the tensors
        # this stage only passes on (received buffers) and outputs that are views (a linear layer on 3-D input).
        received = {id(t) for t in inputs}
        outputs = (state[k] for k in self.output_keys())
        return tuple(t.clone() if id(t) in received or t._base is not None else t for t in outputs)
