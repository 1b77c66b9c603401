"""The interface between the training loop and an engine (native torch.distributed, or DeepSpeed).

The loop only feeds microbatches and reads back numbers; how the model is split, how gradients are reduced and
how the optimizer is sharded is the engine's business.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bigmodel.checkpoint.io import Purger
from bigmodel.checkpoint.sharded import PendingSave
from bigmodel.parallel.context import ParallelContext


@dataclass
class StepStats:
    """What one optimizer step reports. Losses are means over the step's microbatches."""

    loss: float
    parts: dict[str, float] = field(default_factory=dict)
    grad_norm: float = 0.0
    lr: float = 0.0
    logit_scale: float | None = None
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    """Whole gradients by parameter name, only when asked for (verification)."""


class Engine(ABC):
    """Owns the model, optimizer and schedule; runs forward, backward and the optimizer step."""

    model: nn.Module
    device: torch.device
    ctx: ParallelContext

    @abstractmethod
    def train_step(self, microbatches: Sequence[dict[str, torch.Tensor]], capture_grads: bool = False) -> StepStats:
        """Forward and backward every microbatch, accumulate, clip, step the optimizer and the schedule.

        With `capture_grads`, also return the whole gradients (before clipping) in StepStats.grads."""

    memory: dict[str, int] | None
    """This rank's bytes of parameters, gradients and optimizer state, measured during the first step."""

    @abstractmethod
    def forward_eval(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model outputs for `batch` without gradients (eval mode)."""

    def mean_over_data_parallel(self, sums: dict[str, torch.Tensor], microbatches: int) -> dict[str, float]:
        """Per-microbatch means of the logged losses, averaged over data-parallel ranks (one all-reduce)."""
        names = list(sums)
        stacked = torch.stack([sums[n] for n in names]) / microbatches
        if self.ctx.dp_group is not None:
            dist.all_reduce(stacked, group=self.ctx.dp_group)
            stacked /= self.ctx.dims.dp
        return dict(zip(names, stacked.tolist(), strict=True))

    @abstractmethod
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
        """Save this engine's state as checkpoint `step` of the run `run_dir` with bigmodel's manifest (JSON `extra`
        in it), point `latest` at it and keep the newest `keep` (bigmodel.checkpoint.run); every rank calls it.
        `async_`, `group` and `purger` as for bigmodel.checkpoint.sharded.save_sharded."""

    @abstractmethod
    def load_checkpoint(self, path: Path, checked: Collection[str] = ()) -> dict[str, Any]:
        """Load the checkpoint folder `path` into this engine and return its `extra`; every rank calls it. `checked`:
        files whose checksums the load checks as it reads them (`load_sharded`)."""
