"""Contrastive image-text loss (InfoNCE, symmetric over image->text and text->image), local or across ranks.

Across data-parallel ranks it follows OpenCLIP's scheme: every rank gathers all ranks' embeddings *with gradient*
and computes the loss of its own rows against all columns ("local loss"). Averaging the ranks' gradients, as data
parallelism does, then gives exactly the gradient of the loss over the whole global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 to fp32 for logits and softmax (as autocast would); fp32 and fp64 are left as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate `x` (B, ...) from every rank of `group` in rank order -> (B * world, ...).

    Differentiable: the backward sums each rank's gradient for every slice and hands a rank the sum for its own.
    All ranks of `group` must call it with equally shaped `x`.
    """
    gathered = funcol.all_gather_single_autograd(x.contiguous(), gather_dim=0, group=group)
    return funcol.wait_tensor(gathered)


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies over this rank's rows.

    image_embeds, text_embeds: (B, E), unit-norm; row i of each is a matching pair. logit_scale: the inverse
    temperature, (1,) or the same value per row (B, 1). Without `group` every other caption (image) of the batch is
    a negative. With `group` (the data-parallel ranks, each holding B rows of the global batch in rank order) the
    negatives are the whole global batch; the mean over ranks of the returned values equals the global-batch loss,
    and so do the averaged gradients.
    """
    image_embeds, text_embeds, logit_scale = upcast(image_embeds), upcast(text_embeds), upcast(logit_scale)
    if group is None or dist.get_world_size(group) == 1:
        all_images, all_texts, offset = image_embeds, text_embeds, 0
    else:
        all_images = gather_with_grad(image_embeds, group)
        all_texts = gather_with_grad(text_embeds, group)
        offset = dist.get_rank(group) * image_embeds.shape[0]
    targets = torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset
    image_to_text = logit_scale * image_embeds @ all_texts.t()  # (B, B * world)
    text_to_image = logit_scale * text_embeds @ all_images.t()  # (B, B * world)
    return (F.cross_entropy(image_to_text, targets) + F.cross_entropy(text_to_image, targets)) / 2
