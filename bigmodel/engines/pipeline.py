"""The native engine with a pipeline: torch.distributed.pipelining stages and schedules over the pp mesh axis,
composed with data parallel (ZeRO 0-3) and tensor parallel inside every stage."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.tensor import DTensor, Shard

from bigmodel.config.layout import EMBEDDING_OBJECTIVES
from bigmodel.config.schema import Config
from bigmodel.engines.base import StepStats
from bigmodel.engines.native import NativeEngine
from bigmodel.losses import active_objectives, total_loss
from bigmodel.models.encoder import next_token_labels
from bigmodel.optim import build_optimizer, build_scheduler
from bigmodel.parallel.context import ParallelContext
from bigmodel.parallel.data_parallel import ZeroOptimizer
from bigmodel.parallel.grad_norm import clip_grad_norm_
from bigmodel.parallel.parallelize import parallelize_module_parts
from bigmodel.parallel.pipeline import PipelineStageModel, plan_stages, stages_per_rank
from bigmodel.parallel.tensor_parallel import loss_context

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
}


class StageParts:
    """The stage modules one rank holds, seen as one model: their parameters under the unsplit model's names."""

    def __init__(self, modules: list[PipelineStageModel]):
        self.modules = modules

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for module in self.modules:
            yield from module.named_parameters()

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.named_parameters():
            yield param

    def train(self) -> None:
        for module in self.modules:
            module.train()

    def eval(self) -> None:
        for module in self.modules:
            module.eval()


class Timeline:
    """Start and end times of every stage's forward and backward per microbatch, for one step."""

    def __init__(self) -> None:
        self.recording = False
        self.events: list[dict[str, Any]] = []

    def wrap(self, stage: PipelineStage) -> None:
        """Time the stage's forward, backward (input) and weight-gradient computations."""
        for method, kind in (
            ("forward_one_chunk", "forward"),
            ("backward_one_chunk", "backward"),
            ("backward_weight_one_chunk", "backward_weight"),
        ):
            original = getattr(stage, method)

            def timed(chunk, *args, _original=original, _kind=kind, **kwargs):
                if not self.recording:
                    return _original(chunk, *args, **kwargs)
                start = time.perf_counter()
                result = _original(chunk, *args, **kwargs)
                event = {"stage": stage.stage_index, "kind": _kind, "microbatch": chunk}
                self.events.append(event | {"start": start, "end": time.perf_counter()})
                return result

            setattr(stage, method, timed)

    def extend_forward(self, stage_index: int) -> None:
        """Count the loss, which the schedule computes after the last stage's forward, as that forward's busy time."""
        if not self.recording:
            return
        for event in reversed(self.events):
            if event["stage"] == stage_index and event["kind"] == "forward":
                event["end"] = time.perf_counter()
                return


class PipelineEngine(NativeEngine):
    """Training with parallel.pp > 1. Every rank holds one stage (gpipe, 1f1b) or several (interleaved_1f1b,
    zero_bubble: stages r, r + pp, ...), each a PipelineStageModel laid out like the non-pipelined model."""

    def __init__(self, cfg: Config, ctx: ParallelContext):
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        objectives = active_objectives(cfg.train.loss_weights)
        plans = plan_stages(cfg, objectives)
        self.pp_group = ctx.meshes.pp.get_group()
        pp_rank, pp = ctx.meshes.pp.get_local_rank(), ctx.dims.pp
        local = [plans[pp_rank + k * pp] for k in range(stages_per_rank(cfg))]
        self.stage_modules = []
        for plan in local:
            with torch.device("meta"):
                module = PipelineStageModel(cfg.model, objectives, plan)
            parallelize_module_parts(module, cfg, ctx)
            self.stage_modules.append(module)
        self.model = StageParts(self.stage_modules)
        self.stages = [
            PipelineStage(module, module.plan.index, len(plans), self.device, group=self.pp_group)
            for module in self.stage_modules
        ]
        self.timeline = Timeline()
        for stage in self.stages:
            self.timeline.wrap(stage)
        self.first_module = next((m for m in self.stage_modules if m.plan.embed), None)
        self.is_last = any(m.plan.heads for m in self.stage_modules)
        self.last_module = next((m for m in self.stage_modules if m.plan.heads), None)
        schedule_class = SCHEDULES[cfg.parallel.pp_schedule]
        multi = schedule_class in (ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble)
        stage_arg = self.stages if multi else self.stages[0]
        # scale_grads: the schedule divides gradients by the microbatch count, as accumulation does.
        self.schedule = schedule_class(stage_arg, cfg.parallel.microbatches, loss_fn=self.loss_fn, scale_grads=True)
        self.zero = None
        if ctx.dims.dp > 1 and ctx.dims.zero_stage < 3:
            self.zero = ZeroOptimizer(
                self.model, cfg.train, ctx.meshes.dp, ctx.dims.zero_stage, gloo_transport=cfg.parallel.gloo_transport
            )
            self.optimizer = self.zero.optimizer
        else:
            self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.memory = None
        self._parts: list[dict[str, torch.Tensor]] = []

    def loss_fn(self, output: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        """The objectives' weighted sum for one microbatch, on the last stage; `target` is its `loss_target`.

        The schedule also calls it once on made-up activations to infer the backward's shapes; only the last
        parallel.microbatches records of a step are real (see reported_losses).
        """
        outputs = select_masked(dict(zip(self.last_module.output_keys(), output, strict=True)), target)
        train = self.cfg.train
        loss, parts = total_loss(outputs, train.loss_weights, self.ctx.dp_group, train.siglip_exchange)
        self._parts.append({"loss": loss.detach(), **parts})
        self.timeline.extend_forward(self.last_module.plan.index)
        return loss

    def loss_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The per-position labels (B, L) the loss reads besides the last stage's outputs (-100: not scored): the
        captioning targets when captioning trains, else mlm_labels. Captioning and MLM never train together
        (bigmodel.config.validate.check_objectives), so one tensor serves either."""
        if "caption" in active_objectives(self.cfg.train.loss_weights):
            return next_token_labels(batch["input_ids"], batch["attention_mask"])
        return batch["mlm_labels"]

    def run_schedule(self, batch: dict[str, torch.Tensor], train: bool) -> Any:
        """One pass of the schedule over `batch` (this rank's share; split into parallel.microbatches)."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        first = self.first_module
        args = [batch[k] for k in first.input_keys()] if first is not None else []
        target = self.loss_target(batch) if self.is_last else None
        with loss_context(self.ctx.dims.tp > 1):
            if train:
                return self.schedule.step(*args, target=target, losses=[])
            with torch.no_grad():  # the schedule computes the loss on every pass that has a loss_fn: give it targets
                return self.schedule.eval(*args, target=target)

    def train_step(self, microbatches: Sequence[dict[str, torch.Tensor]], capture_grads: bool = False) -> StepStats:
        """One optimizer step; the pipeline schedule splits this rank's batch into parallel.microbatches."""
        if len(microbatches) != 1:
            raise ValueError("with a pipeline, the schedule makes the microbatches; use train.grad_accum=1")
        self.model.train()
        self._parts = []
        self.run_schedule(microbatches[0], train=True)
        return self.optimizer_step(self.reported_losses(), capture_grads)

    def model_parts(self) -> list[nn.Module]:
        return list(self.stage_modules)

    def gather_timeline(self) -> list[list[dict[str, Any]]]:
        """The recorded timeline events of every pipeline rank, in pp-rank order (a collective over the pp group)."""
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size(self.pp_group))]
        dist.all_gather_object(gathered, self.timeline.events, group=self.pp_group)
        self.timeline.events = []
        return gathered

    def reported_losses(self) -> dict[str, float]:
        """Means over microbatches and data-parallel ranks, from the last stage, known to every rank."""
        names = ["loss", *active_objectives(self.cfg.train.loss_weights)]
        values = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        if self.is_last:
            real = self._parts[-self.cfg.parallel.microbatches :]
            for i, name in enumerate(names):
                values[i] = sum(float(p[name]) for p in real) / len(real)
        dist.all_reduce(values, group=self.pp_group)  # only the last stage contributes
        if self.ctx.dp_group is not None:
            dist.all_reduce(values, group=self.ctx.dp_group)
            values /= self.ctx.dims.dp
        return dict(zip(names, values.tolist(), strict=True))

    def clip_gradients(self) -> torch.Tensor:
        max_norm = self.cfg.train.grad_clip
        if self.zero is not None:
            return self.zero.clip_grad_norm_(max_norm, self.pp_group)
        return clip_grad_norm_([p.grad for p in self.model.parameters() if p.grad is not None], max_norm, self.pp_group)

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every parameter's whole gradient on every rank (a collective over all groups; for verification)."""
        local = super().full_gradients()
        gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(dist.get_world_size(self.pp_group))]
        dist.all_gather_object(gathered, {k: v.cpu() for k, v in local.items()}, group=self.pp_group)
        return {name: grad for part in gathered for name, grad in part.items()}

    def logit_scale(self) -> float | None:
        """exp(logit scale), from the stage that holds it, known to every rank."""
        value = torch.zeros(1, dtype=torch.float64, device=self.device)
        for module in self.stage_modules:
            head = getattr(module, "contrastive", None)
            if head is not None:
                scale = head.logit_scale.detach()
                scale = scale.full_tensor() if isinstance(scale, DTensor) else scale
                value += scale.exp().double()
        if not set(EMBEDDING_OBJECTIVES) & set(active_objectives(self.cfg.train.loss_weights)):
            return None
        dist.all_reduce(value, group=self.pp_group)
        return value.item()

    @torch.no_grad()
    def forward_eval(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward only through the pipeline; the last stage's outputs are broadcast to every pipeline rank."""
        self.model.eval()
        rows = batch["input_ids"].shape[0]
        padded = pad_rows(batch, self.cfg.parallel.microbatches)
        output = self.run_schedule(padded, train=False)
        outputs = None
        if self.is_last:
            outputs = dict(zip(self.last_module.output_keys(), output, strict=True))
            outputs = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in outputs.items()}
            outputs = select_masked(trim_outputs(outputs, padded, rows), self.loss_target(batch).to(self.device))
        box = [outputs]
        last_rank = dist.get_global_rank(self.pp_group, dist.get_world_size(self.pp_group) - 1)
        dist.broadcast_object_list(box, src=last_rank, group=self.pp_group)
        return box[0]


def pad_rows(batch: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """`batch` with its last row repeated until the row count is a multiple of `multiple` (at least `multiple`)."""
    rows = batch["input_ids"].shape[0]
    target = max(multiple, -(-rows // multiple) * multiple)
    if target == rows:
        return batch
    index = torch.cat([torch.arange(rows), torch.full((target - rows,), rows - 1)])
    return {k: v[index] for k, v in batch.items()}


def trim_outputs(outputs: dict[str, torch.Tensor], padded: dict[str, torch.Tensor], rows: int) -> dict[str, Any]:
    """Drop what the padding rows of `pad_rows` added to the merged outputs of the microbatches."""
    total = padded["input_ids"].shape[0]
    if total == rows:
        return outputs
    trimmed = dict(outputs)
    for key in ("image_embeds", "text_embeds", "mlm_logits", "caption_logits"):
        if key in outputs:
            trimmed[key] = outputs[key][:rows]
    # ITM rows are pairs laid out per microbatch, which the padding changed: skip ITM for this batch.
    trimmed.pop("itm_logits", None)
    trimmed.pop("itm_labels", None)
    return trimmed


def select_masked(outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Turn every-position MLM or captioning logits (B, L, V) into the scored positions' (M, V) and their labels
    (M,) (`labels` (B, L), -100 where not scored)."""
    name = next((n for n in ("mlm", "caption") if f"{n}_logits" in outputs), None)
    if name is None:
        return outputs
    selected = labels != -100
    logits = outputs[f"{name}_logits"]
    if isinstance(logits, DTensor):  # vocab-sharded under tensor parallelism: select rows of the local shard
        local = logits.to_local()[selected]  # (M, V / tp)
        placements = [Shard(1) if p.is_shard() else p for p in logits.placements]
        logits = DTensor.from_local(local, logits.device_mesh, placements, run_check=False)
    else:
        logits = logits[selected]
    return outputs | {f"{name}_logits": logits, f"{name}_labels": labels[selected]}
