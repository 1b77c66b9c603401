"""The native engine: PyTorch's own parallelism (DTensor tensor parallel, FSDP2, our ZeRO 0-2 over torch
collectives) applied to the plain model by `bigmodel.parallel`. On one process it is the reference every layout
must reproduce.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from bigmodel.checkpoint.io import Purger
from bigmodel.checkpoint.records import pack_hyperparameters, unpack_hyperparameters
from bigmodel.checkpoint.run import save_checkpoint
from bigmodel.checkpoint.sharded import PendingSave, load_sharded
from bigmodel.config.schema import Config
from bigmodel.engines.accumulation import microbatch_losses
from bigmodel.engines.base import Engine, StepStats
from bigmodel.engines.state import (
    IMPLEMENTATION_KEYS,
    load_model_state,
    load_parts_optimizer_state,
    model_state,
    parts_optimizer_state,
)
from bigmodel.losses import active_objectives
from bigmodel.optim import build_optimizer, build_scheduler
from bigmodel.parallel.context import ParallelContext
from bigmodel.parallel.data_parallel import ZeroOptimizer
from bigmodel.parallel.grad_norm import clip_grad_norm_
from bigmodel.parallel.memory import model_state_bytes
from bigmodel.parallel.parallelize import build_parallel_model
from bigmodel.parallel.tensor_parallel import align_gradients, loss_context


class NativeEngine(Engine):
    """Training in any layout of ParallelDims: data parallel (ZeRO 0-3, HSDP) x tensor (+ sequence) parallel.

    ZeRO stages 0-2 (with more than one data-parallel rank) keep whole parameters and go through ZeroOptimizer;
    stage 3 shards parameters with FSDP2 and uses a plain AdamW over the sharded DTensors, as does a run with a
    single data-parallel rank.
    """

    def __init__(self, cfg: Config, ctx: ParallelContext):
        self.cfg = cfg
        self.ctx = ctx
        self.device = ctx.device
        self.model = build_parallel_model(cfg, ctx, active_objectives(cfg.train.loss_weights))
        dims = ctx.dims
        self.zero: ZeroOptimizer | None = None
        if dims.dp > 1 and dims.zero_stage < 3:
            self.zero = ZeroOptimizer(
                self.model, cfg.train, ctx.meshes.dp, dims.zero_stage, gloo_transport=cfg.parallel.gloo_transport
            )
            self.optimizer = self.zero.optimizer
        else:
            self.optimizer = build_optimizer(self.model, cfg.train, foreach=dims.zero_stage == 3)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.memory: dict[str, int] | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for the forward when train.precision is bf16; parameters and optimizer stay fp32."""
        if self.cfg.train.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, microbatches: Sequence[dict[str, torch.Tensor]], capture_grads: bool = False) -> StepStats:
        """One optimizer step over this rank's share of each microbatch. Every rank of the job calls it.

        With `capture_grads`, StepStats.grads holds every parameter's whole gradient (averaged over data-parallel
        ranks, before clipping), a collective meant for verification on small models.
        """
        self.model.train()

        def forward(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.autocast():
                return self.model(batch)

        logged: dict[str, torch.Tensor] = {}
        # Vocab-parallel cross-entropy needs forward, loss and backward inside loss_parallel.
        with loss_context(self.ctx.dims.tp > 1):
            for loss in microbatch_losses(
                forward, microbatches, self.cfg.train, self.ctx.dp_group, self.device, logged
            ):
                loss.backward()
        return self.optimizer_step(self.mean_over_data_parallel(logged, 1), capture_grads)

    def model_parts(self) -> list[nn.Module]:
        """The modules this rank trains (one here; a pipeline rank may hold several stages)."""
        return [self.model]

    def optimizer_step(self, losses: dict[str, float], capture_grads: bool) -> StepStats:
        """After the last backward of a step: finish the gradient reduction, optionally capture the gradients,
        clip, step the optimizer and the schedule, and report the step with `losses` ({"loss": ..., parts})."""
        if self.ctx.dims.tp > 1 and self.ctx.dims.zero_stage < 3:  # FSDP reduces its own gradients
            for module in self.model_parts():
                align_gradients(module)
        if self.zero is not None:
            self.zero.sync_gradients()
        grads = self.full_gradients() if capture_grads else {}
        grad_norm = self.clip_gradients()
        lr = self.optimizer.param_groups[0]["lr"]
        grad_bytes = self.model_state_bytes()["grads"] if self.memory is None else 0
        (self.zero or self.optimizer).step()
        if self.memory is None:  # optimizer state exists from the first step on
            self.memory = self.model_state_bytes() | {"grads": grad_bytes}
        self.scheduler.step()
        self.zero_grad()
        losses = dict(losses)
        return StepStats(
            loss=losses.pop("loss"),
            parts=losses,
            grad_norm=grad_norm.item(),
            lr=lr,
            logit_scale=self.logit_scale(),
            grads=grads,
        )

    def clip_gradients(self) -> torch.Tensor:
        """Clip to train.grad_clip (0: off) by the global norm over every shard; return the norm before clipping."""
        max_norm = self.cfg.train.grad_clip
        if self.zero is not None:
            return self.zero.clip_grad_norm_(max_norm)
        return clip_grad_norm_([p.grad for p in self.model.parameters() if p.grad is not None], max_norm)

    def zero_grad(self) -> None:
        if self.zero is not None:
            self.zero.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Whole gradients of the trainable parameters by name (frozen ones, train.lock_image / lock_text, have
        none); a collective under tensor parallelism, FSDP or ZeRO-2."""
        if self.zero is not None:
            return self.zero.full_gradients()
        full = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            grad = param.grad
            assert grad is not None, name
            full[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().clone()
        return full

    def logit_scale(self) -> float | None:
        head = getattr(self.model, "contrastive", None)
        if head is None:
            return None
        value = head.logit_scale.detach()
        value = value.full_tensor() if isinstance(value, DTensor) else value
        return value.exp().item()

    @torch.no_grad()
    def forward_eval(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.model.eval()
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.autocast():
            out = self.model(batch)
        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in out.items()}

    def model_state_bytes(self) -> dict[str, int]:
        """This rank's bytes of parameters, gradients and optimizer state (call between backward and zero_grad,
        or after a step for parameters and optimizer state)."""
        return model_state_bytes(self.model, self.zero or self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        """`{"model": ..., "optim": ..., "scheduler": ...}` keyed by the unsplit model's names, what a checkpoint
        stores (bigmodel.engines.state). Tensors are this rank's shards or whole tensors sharing storage with the model
        and the optimizer where they can, so `dcp.load` into this dict loads in place. Every rank calls it (a
        collective for ZeroOptimizer stages 1 and 2)."""
        parts = self.model_parts()
        model = model_state(parts)
        if self.zero is not None:
            optim = pack_hyperparameters(self.zero.fqn_state_dict())
        else:
            optim = parts_optimizer_state(parts, self.optimizer, packed=True)
        return {"model": model, "optim": optim, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put `state` (state_dict's form, saved in any layout, filled by `dcp.load`) into the model, optimizer and
        schedule; the optimizer keeps its own implementation settings (IMPLEMENTATION_KEYS)."""
        optim = unpack_hyperparameters(state["optim"])
        implementation = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in self.optimizer.param_groups]
        load_model_state(self.model_parts(), state["model"])
        if self.zero is not None:
            self.zero.load_fqn_state_dict(optim)
        else:
            load_parts_optimizer_state(self.model_parts(), self.optimizer, optim)
        for group, own in zip(self.optimizer.param_groups, implementation, strict=True):
            group.update(own)
        self.scheduler.load_state_dict(state["scheduler"])

    def layout(self) -> dict[str, Any]:
        """The ParallelDims this engine runs in, as the manifest records it."""
        return asdict(self.ctx.dims)

    def save_checkpoint(
        self,
        run_dir: Path,
        step: int,
        extra: dict[str, Any],
        keep: int,
        async_: bool = False,
        group: dist.ProcessGroup | None = None,
        purger: Purger | None = None,
    ) -> PendingSave:
        """The layout-independent sharded format (bigmodel.checkpoint.sharded), of state_dict()."""
        return save_checkpoint(run_dir, step, self, extra, keep, async_, group, purger)

    def load_checkpoint(self, path: Path, checked: Collection[str] = ()) -> dict[str, Any]:
        return load_sharded(path, self, checked)
