"""The sigmoid loss across ranks against the whole-batch loss computed on one rank: values, gradients, and the
logits blocks each rank materialises.

Every rank builds the same global inputs from a fixed seed, takes its contiguous slice, computes the distributed
loss and its gradients, and compares with the single-process loss over the whole batch (computed on every rank).
"""

import argparse
import json
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

import bigmodel.losses.siglip as siglip
from bigmodel.losses import siglip_loss
from bigmodel.parallel.env import exit_distributed

B_LOCAL, E = 4, 8


def global_inputs(world: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(B_LOCAL * world, E, generator=gen), dim=-1)
    # Texts near their images, so positives and negatives both carry gradient (the paper's init saturates them).
    texts = F.normalize(images + torch.randn(B_LOCAL * world, E, generator=gen), dim=-1)
    return [images, texts, torch.tensor(5.0), torch.tensor(-2.0)]


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs().max() / reference.abs().max()).item()


@contextmanager
def replaced(name: str, value):
    """siglip.<name> is `value` inside the block (siglip_loss looks its helpers up at call time)."""
    original = getattr(siglip, name)
    setattr(siglip, name, value)
    try:
        yield
    finally:
        setattr(siglip, name, original)


def recording_block_shapes(shapes: list):
    """A stand-in for siglip._pair_loss that logs the shape of every logits block it builds, then builds it."""
    pair_loss = siglip._pair_loss

    def recorded(images, texts, *args, **kwargs):
        shapes.append([images.shape[0], texts.shape[0]])
        return pair_loss(images, texts, *args, **kwargs)

    return recorded


class _PassWithoutReturningGradients(torch.autograd.Function):
    """A broken ring: the forward of pass_to_next_rank, a backward that keeps each gradient where it is."""

    @staticmethod
    def forward(ctx, x, group):
        return siglip._shift(x.contiguous(), group, step=1)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def siglip_check(rank: int, world: int, exchange: str) -> dict:
    """Distributed against single-process loss and gradients; the (b, n) blocks built in forward and backward."""
    values = global_inputs(world)
    ref = [v.clone().requires_grad_() for v in values]
    reference = siglip_loss(*ref)
    reference.backward()

    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    local = [values[0][rows].clone(), values[1][rows].clone(), values[2].clone(), values[3].clone()]
    local = [v.requires_grad_() for v in local]
    shapes: list = []
    # One recorder for both passes: the ring's checkpoint recomputes with the function it was given in forward.
    with replaced("_pair_loss", recording_block_shapes(shapes)):
        loss = siglip_loss(*local, group=dist.group.WORLD, exchange=exchange)
        in_forward = len(shapes)
        loss.backward()
    # Data parallelism averages over ranks: the loss values and the replicated scale and bias gradients. The
    # embedding gradients are already each rank's share of sum_r L_r, so they only need the 1/W.
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    scale_grad, bias_grad = local[2].grad.clone(), local[3].grad.clone()
    dist.all_reduce(scale_grad)
    dist.all_reduce(bias_grad)
    return {
        "loss_dev": abs(mean_loss.item() / world - reference.item()) / reference.item(),
        "image_grad_dev": relative(local[0].grad / world, ref[0].grad[rows]),
        "text_grad_dev": relative(local[1].grad / world, ref[1].grad[rows]),
        "scale_grad_dev": relative(scale_grad / world, ref[2].grad),
        "bias_grad_dev": relative(bias_grad / world, ref[3].grad),
        "grad_scale": min(ref[0].grad.abs().max().item(), ref[1].grad.abs().max().item()),
        "blocks": {"forward": shapes[:in_forward], "backward": shapes[in_forward:]},
    }


def broken_ring_check(rank: int, world: int) -> dict:
    """The text gradients with a ring whose backward does not return gradients to the rows' own ranks."""
    values = global_inputs(world)
    ref = values[1].clone().requires_grad_()
    siglip_loss(values[0], ref, values[2], values[3]).backward()
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    texts = values[1][rows].clone().requires_grad_()
    with replaced("pass_to_next_rank", _PassWithoutReturningGradients.apply):
        loss = siglip_loss(values[0][rows], texts, values[2], values[3], group=dist.group.WORLD, exchange="ring")
        loss.backward()
    return {"text_grad_dev": relative(texts.grad / world, ref.grad[rows])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {exchange: siglip_check(rank, world, exchange) for exchange in ("gather", "ring")}
    results["broken_ring"] = broken_ring_check(rank, world)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    exit_distributed(0)


if __name__ == "__main__":
    main()
