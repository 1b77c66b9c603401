"""Cross-rank losses against the whole-batch loss computed on one rank: values and gradients.

Every rank builds the same global inputs from a fixed seed, takes its contiguous slice, computes the distributed
loss and its gradient, and compares with the single-process loss over the whole batch (computed on every rank).
"""

import argparse
import json

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bigmodel.losses import contrastive_loss, masked_lm_loss
from bigmodel.parallel.env import exit_distributed


def contrastive_check(rank: int, world: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    n, e = 4 * world, 8
    images = F.normalize(torch.randn(n, e, generator=gen, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(n, e, generator=gen, dtype=torch.float64), dim=-1)
    scale = torch.tensor(10.0, dtype=torch.float64)

    ref_images, ref_texts = images.clone().requires_grad_(), texts.clone().requires_grad_()
    ref_scale = scale.clone().requires_grad_()
    reference = contrastive_loss(ref_images, ref_texts, ref_scale)
    reference.backward()

    rows = slice(rank * 4, rank * 4 + 4)
    local_images, local_texts = images[rows].clone().requires_grad_(), texts[rows].clone().requires_grad_()
    local_scale = scale.clone().requires_grad_()
    loss = contrastive_loss(local_images, local_texts, local_scale, dist.group.WORLD)
    loss.backward()
    # Data parallelism averages gradients over ranks; do the same to the per-rank results.
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    scale_grad = local_scale.grad.clone()
    dist.all_reduce(scale_grad)
    return {
        "loss_dev": abs(mean_loss.item() / world - reference.item()),
        "image_grad_dev": (local_images.grad / world - ref_images.grad[rows]).abs().max().item(),
        "text_grad_dev": (local_texts.grad / world - ref_texts.grad[rows]).abs().max().item(),
        "scale_grad_dev": abs(scale_grad.item() / world - ref_scale.grad.item()),
        "grad_scale": ref_images.grad.abs().max().item(),
    }


def masked_lm_check(rank: int, world: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    counts = [3 + 2 * r for r in range(world)]  # ranks mask different numbers of tokens
    logits = torch.randn(sum(counts), 11, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 11, (sum(counts),), generator=gen)
    ref_logits = logits.clone().requires_grad_()
    reference = F.cross_entropy(ref_logits, labels)
    reference.backward()
    start = sum(counts[:rank])
    rows = slice(start, start + counts[rank])
    local = logits[rows].clone().requires_grad_()
    loss = masked_lm_loss(local, labels[rows], dist.group.WORLD)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    return {
        "loss_dev": abs(mean_loss.item() / world - reference.item()),
        "grad_dev": (local.grad / world - ref_logits.grad[rows]).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"contrastive": contrastive_check(rank, world), "mlm": masked_lm_check(rank, world)}
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    exit_distributed(0)


if __name__ == "__main__":
    main()
