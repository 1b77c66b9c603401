"""The native engine: plain PyTorch on one process. Parallel layouts build on this in bigmodel/parallel."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from bigmodel.config.schema import Config
from bigmodel.engines.base import Engine, StepStats
from bigmodel.losses import active_objectives, total_loss
from bigmodel.models import build_model
from bigmodel.train.optim import build_optimizer, build_scheduler


class NativeEngine(Engine):
    """Single-process training: the reference every parallel layout must reproduce."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.model = build_model(cfg.model, active_objectives(cfg.train.loss_weights), cfg.train.seed, device)
        self.model.set_activation_checkpointing(cfg.train.activation_checkpointing)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for the forward when train.precision is bf16; parameters and optimizer stay fp32."""
        if self.cfg.train.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, microbatches: Sequence[dict[str, torch.Tensor]]) -> StepStats:
        self.model.train()
        weights = self.cfg.train.loss_weights
        loss_sum = torch.zeros((), device=self.device)
        part_sums: dict[str, torch.Tensor] = {}
        for batch in microbatches:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.autocast():
                outputs = self.model(batch)
            loss, parts = total_loss(outputs, weights)
            (loss / len(microbatches)).backward()
            loss_sum += loss.detach()
            for name, value in parts.items():
                part_sums[name] = part_sums.get(name, 0.0) + value
        max_norm = self.cfg.train.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        n = len(microbatches)
        scale = getattr(self.model, "contrastive", None)
        return StepStats(
            loss=loss_sum.item() / n,
            parts={name: value.item() / n for name, value in part_sums.items()},
            grad_norm=grad_norm.item(),
            lr=lr,
            logit_scale=scale.logit_scale.exp().item() if scale is not None else None,
        )

    @torch.no_grad()
    def forward_eval(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.model.eval()
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.autocast():
            return self.model(batch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])


def build_engine(cfg: Config, device: torch.device) -> Engine:
    """The engine named by cfg.engine (validation has already refused engines that are not available)."""
    return NativeEngine(cfg, device)
