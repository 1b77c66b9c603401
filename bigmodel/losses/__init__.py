"""Pretraining objectives and their weighted sum, on one rank or across data-parallel ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from bigmodel.config.layout import active_objectives
from bigmodel.config.schema import LossWeights
from bigmodel.losses.contrastive import contrastive_loss, gather_with_grad, upcast
from bigmodel.losses.siglip import Exchange, siglip_loss

__all__ = [
    "active_objectives",
    "contrastive_loss",
    "embedding_losses",
    "gather_with_grad",
    "masked_lm_loss",
    "siglip_loss",
    "total_loss",
]


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Cross-entropy over the scored positions, normalised by their count in the whole microbatch: MLM's masked
    tokens, and captioning's next tokens (total_loss uses it for both).

    logits (M, V) and labels (M,) for this rank's M scored positions. Ranks score different numbers of tokens, so a
    plain per-rank mean averaged over ranks would weight tokens unequally; with `group` the per-rank value is
    scaled so that the mean over ranks (what data-parallel gradient averaging computes) is the global token mean.
    """
    loss = F.cross_entropy(upcast(logits), labels)
    if isinstance(loss, DTensor):
        # Vocab-sharded logits under loss_parallel() (tensor parallelism) give a replicated DTensor. As a plain
        # tensor it adds to the other objectives' plain losses; its gradient re-enters as a replicated DTensor.
        loss = loss.to_local()
    if group is None or dist.get_world_size(group) == 1:
        return loss
    counts = torch.tensor([float(labels.numel())], dtype=loss.dtype, device=labels.device)
    total = counts.clone()
    dist.all_reduce(total, group=group)
    return loss * (counts * dist.get_world_size(group) / total).squeeze(0)


def embedding_losses(
    outputs: dict[str, torch.Tensor],
    dp_group: dist.ProcessGroup | None = None,
    siglip_exchange: Exchange = "gather",
) -> dict[str, torch.Tensor]:
    """The objective scored on pooled embeddings present in `outputs` (contrastive, or SigLIP when the head has a
    logit bias), by name; undetached. Across `dp_group` as `total_loss` says."""
    if "image_embeds" not in outputs:
        return {}
    images, texts, scale = outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"]
    if "logit_bias" in outputs:  # the SigLIP head's
        return {"siglip": siglip_loss(images, texts, scale, outputs["logit_bias"], dp_group, siglip_exchange)}
    return {"contrastive": contrastive_loss(images, texts, scale, dp_group)}


def total_loss(
    outputs: dict[str, torch.Tensor],
    weights: LossWeights,
    dp_group: dist.ProcessGroup | None = None,
    siglip_exchange: Exchange = "gather",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of the objectives present in `outputs` (from MultimodalEncoder.forward) and each part.

    With `dp_group`, each rank holds its slice of the microbatch and the values are such that their mean over the
    data-parallel ranks (and the mean of the gradients) equals the single-process loss on the whole microbatch.
    Image-text matching needs no correction: every rank scores the same number of pairs. `siglip_exchange`: how
    SigLIP sees the other ranks' texts (train.siglip_exchange). Parts come back detached.
    """
    parts = embedding_losses(outputs, dp_group, siglip_exchange)
    if "itm_logits" in outputs:
        parts["itm"] = F.cross_entropy(upcast(outputs["itm_logits"]), outputs["itm_labels"])
    if "mlm_logits" in outputs:
        parts["mlm"] = masked_lm_loss(outputs["mlm_logits"], outputs["mlm_labels"], dp_group)
    if "caption_logits" in outputs:
        parts["caption"] = masked_lm_loss(outputs["caption_logits"], outputs["caption_labels"], dp_group)
    total = sum(getattr(weights, name) * value for name, value in parts.items())
    return total, {name: value.detach() for name, value in parts.items()}
