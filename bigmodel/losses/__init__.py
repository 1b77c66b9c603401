"""Pretraining objectives and their weighted sum."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigmodel.config.schema import LossWeights
from bigmodel.losses.contrastive import contrastive_loss

__all__ = ["active_objectives", "contrastive_loss", "total_loss"]


def active_objectives(weights: LossWeights) -> tuple[str, ...]:
    """The objectives with a positive weight, in a fixed order; the model builds heads for these only."""
    return tuple(name for name in ("contrastive", "itm", "mlm") if getattr(weights, name) > 0)


def total_loss(outputs: dict[str, torch.Tensor], weights: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of the objectives present in `outputs` (from MultimodalEncoder.forward) and each part.

    The parts are returned detached, for logging.
    """
    parts: dict[str, torch.Tensor] = {}
    if "image_embeds" in outputs:
        parts["contrastive"] = contrastive_loss(outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"])
    if "itm_logits" in outputs:
        parts["itm"] = F.cross_entropy(outputs["itm_logits"].float(), outputs["itm_labels"])
    if "mlm_logits" in outputs:
        parts["mlm"] = F.cross_entropy(outputs["mlm_logits"].float(), outputs["mlm_labels"])
    total = sum(getattr(weights, name) * value for name, value in parts.items())
    return total, {name: value.detach() for name, value in parts.items()}
