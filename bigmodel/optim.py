"""AdamW with decoupled weight decay on weight matrices only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from bigmodel.config.schema import TrainConfig

# Parameters that are matrices in shape but are not weights to shrink: positions, class token, modality rows.
NO_DECAY_NAMES = ("position_embedding", "class_embedding", "modality_embedding")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: weight matrices yes; norms, biases, logit scale, positions and tokens no."""
    return param.ndim >= 2 and not any(part in name for part in NO_DECAY_NAMES)


def build_optimizer(model: nn.Module, cfg: TrainConfig, foreach: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model`, in two groups (with and without weight decay).

    The default per-tensor loop (foreach=False) keeps the update arithmetic identical across layouts whose parameter
    lists differ in length. `foreach=True` dispatches each of AdamW's ops once for all tensors: ZeRO-3 wants it, since
    every op on an FSDP shard pays DTensor dispatch (docs/benchmarks.md, row f); on CPU it runs the
    same per-element arithmetic, so the update stays bitwise equal to the reference's (`bigmodel verify`).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if decays(n, p)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=foreach)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The warmup + cosine schedule as a LambdaLR (its state_dict is the step count)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
