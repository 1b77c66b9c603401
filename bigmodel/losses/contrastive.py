"""Contrastive image-text loss (InfoNCE, symmetric over image->text and text->image)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies over the batch.

    image_embeds, text_embeds: (B, E), unit-norm; row i of each is a matching pair. logit_scale: () inverse
    temperature. Every other caption (image) in the batch is a negative.
    """
    logits = logit_scale * image_embeds @ text_embeds.t()  # (B, B)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
