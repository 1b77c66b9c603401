"""SigLIP's sigmoid pairwise loss (Zhai et al. 2023), on one rank or across data-parallel ranks.

Every (image, text) pair of the batch is its own binary classification: +1 for a matching pair, -1 for any other.
The value is OpenCLIP's: the sum over all pairs a rank scores, divided by its number of images. With W ranks of b
rows each, rank r scores its b images against all B = b * W texts and returns L_r = S_r / b; the single-process
loss on the B rows is L = S / B with S = sum_r S_r, so L = mean_r L_r exactly. The exchanges' backward hands every
rank the gradient of sum_r L_r for its own rows, so averaging gradients over ranks, as data parallelism does,
gives the gradient of L (embeddings, scale and bias alike).

Two ways to see the other ranks' texts: "gather" all-gathers them with gradient and scores (b, B) logits at once;
"ring" passes them to the next rank W - 1 times and scores one (b, b) block per hop, recomputing each block in
backward so that no more than one is held at a time.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bigmodel.losses.contrastive import gather_with_grad, upcast

Exchange = Literal["gather", "ring"]
EXCHANGES = get_args(Exchange)


def _shift(x: torch.Tensor, group: dist.ProcessGroup, step: int) -> torch.Tensor:
    """Send `x` to group rank (rank + step) % W and return what group rank (rank - step) % W sent (same shape)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    received = torch.empty_like(x)
    ops = [
        dist.P2POp(dist.isend, x, group=group, group_peer=(rank + step) % world),
        dist.P2POp(dist.irecv, received, group=group, group_peer=(rank - step) % world),
    ]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received


class _PassToNextRank(torch.autograd.Function):
    """Forward: send to the next rank of the ring, receive from the previous one. Backward: the gradient goes back
    the other way, to the rank the tensor came from."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _shift(x.contiguous(), group, step=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _shift(grad.contiguous(), ctx.group, step=-1), None


def pass_to_next_rank(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The previous rank's `x` (in `group`'s rank order, wrapping around); differentiable. Every rank of `group`
    calls it with equally shaped `x`."""
    return _PassToNextRank.apply(x, group)


def _pair_loss(
    images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, positives_at: int | None
) -> torch.Tensor:
    """-sum of log sigmoid(label * logit) over the (b, n) block of pairs. The positives are pairs (i, positives_at
    + i); with None every pair is a negative."""
    logits = scale * images @ texts.t() + bias  # (b, n)
    labels = -torch.ones_like(logits)
    if positives_at is not None:
        labels.diagonal(positives_at).fill_(1.0)
    return -F.logsigmoid(labels * logits).sum()


def siglip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    exchange: Exchange = "gather",
) -> torch.Tensor:
    """The sigmoid loss of this rank's images against the texts of every rank of `group`, summed over pairs and
    divided by the number of local images.

    image_embeds, text_embeds: (b, E), unit-norm; row i of each is a matching pair. logit_scale is the scale itself
    (exp of the learnable log scale, as contrastive_loss and OpenCLIP's SigLipLoss take it) and logit_bias the bias:
    each a scalar, (1,) or per row (b, 1). With `group` (the
    data-parallel ranks, equal b each, rows in rank order) the mean over ranks of the returned values is the loss
    of the whole batch, and so are the averaged gradients. `exchange` picks how the texts travel (module docstring).
    """
    if exchange not in EXCHANGES:
        raise ValueError(f"siglip exchange must be one of {EXCHANGES}, got {exchange!r}")
    images, texts = upcast(image_embeds), upcast(text_embeds)
    scale, bias = upcast(logit_scale), upcast(logit_bias)
    b = images.shape[0]
    if group is None or dist.get_world_size(group) == 1:
        return _pair_loss(images, texts, scale, bias, positives_at=0) / b
    if exchange == "gather":
        all_texts = gather_with_grad(texts, group)  # (b * W, E), rank order
        return _pair_loss(images, all_texts, scale, bias, positives_at=dist.get_rank(group) * b) / b
    # Every block, the local one too, is recomputed in backward: autograd would otherwise keep each hop's (b, b)
    # block and its intermediates, b x B in all.
    total = _checkpointed_pair_loss(images, texts, scale, bias, positives_at=0)
    for _ in range(dist.get_world_size(group) - 1):
        texts = pass_to_next_rank(texts, group)  # after hop k: the texts of rank (rank - k) % W
        total = total + _checkpointed_pair_loss(images, texts, scale, bias, positives_at=None)
    return total / b


def _checkpointed_pair_loss(
    images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, positives_at: int | None
) -> torch.Tensor:
    """_pair_loss that keeps only its inputs for backward and recomputes the block there."""
    return checkpoint(
        _pair_loss, images, texts, scale, bias, positives_at, use_reentrant=False, preserve_rng_state=False
    )
