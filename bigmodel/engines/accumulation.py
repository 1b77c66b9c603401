"""How a step's microbatches make one gradient (train.accumulation), for every engine that accumulates.

naive: each microbatch's forward, loss and backward on their own, the loss divided by the microbatch count; the
contrastive and SigLIP losses see only one microbatch's negatives.

cached (GradCache, Gao et al. 2021): embed every microbatch without a graph, take the whole step's contrastive or
SigLIP loss on the concatenated embeddings and its gradient w.r.t. them, then re-run each microbatch with a graph
and backpropagate its slice of that gradient. The loss and gradients are those of one batch of every microbatch
(the loss is invariant to the order of the (image, text) pairs, so a rank's microbatches concatenated and gathered
over the data-parallel ranks are the whole global batch), while autograd holds one microbatch's activations. The
other objectives (ITM, MLM, captioning) stay per microbatch, as in naive accumulation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from bigmodel.config.schema import TrainConfig
from bigmodel.losses import embedding_losses, total_loss

EMBEDDING_OUTPUTS = ("image_embeds", "text_embeds", "logit_scale", "logit_bias")
"""The model outputs the embedding objectives read: what cached accumulation caches (the per-row logit scale and
bias too, so their gradients flow back through the second pass)."""

Forward = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def microbatch_losses(
    forward: Forward,
    microbatches: Sequence[dict[str, torch.Tensor]],
    train: TrainConfig,
    dp_group: dist.ProcessGroup | None,
    device: torch.device,
    logged: dict[str, torch.Tensor],
) -> Iterator[torch.Tensor]:
    """For each microbatch in turn, the scalar whose backward adds that microbatch's share of the step's gradient
    (already divided as the step needs: no further scaling by the microbatch count).

    `forward` runs the model on a batch (moving it to the device, under autocast where the engine uses it). The
    caller must backpropagate each yielded scalar before asking for the next. Once the iterator is exhausted,
    `logged` holds this rank's step losses ("loss" and each objective): means over the microbatches, except the
    cached embedding objective's, which is the loss of the whole step's batch. Every rank of `dp_group` iterates.
    """
    if train.accumulation == "cached":
        return _cached(forward, microbatches, train, dp_group, device, logged)
    return _naive(forward, microbatches, train, dp_group, logged)


def _naive(
    forward: Forward,
    microbatches: Sequence[dict[str, torch.Tensor]],
    train: TrainConfig,
    dp_group: dist.ProcessGroup | None,
    logged: dict[str, torch.Tensor],
) -> Iterator[torch.Tensor]:
    count = len(microbatches)
    sums: dict[str, torch.Tensor] = {}
    for batch in microbatches:
        loss, parts = total_loss(forward(batch), train.loss_weights, dp_group, train.siglip_exchange)
        yield loss / count
        _add(sums, {"loss": loss.detach(), **parts})
    logged.update({name: value / count for name, value in sums.items()})


def _cached(
    forward: Forward,
    microbatches: Sequence[dict[str, torch.Tensor]],
    train: TrainConfig,
    dp_group: dist.ProcessGroup | None,
    device: torch.device,
    logged: dict[str, torch.Tensor],
) -> Iterator[torch.Tensor]:
    count = len(microbatches)
    # First pass: embeddings only, no graph; the RNG state before each microbatch, so that the second pass draws
    # the same dropout masks.
    states, cached = [], []
    with torch.no_grad():
        for batch in microbatches:
            states.append(_rng_state(device))
            outputs = forward(batch)
            cached.append({key: outputs[key] for key in EMBEDDING_OUTPUTS if key in outputs})
    rows = [piece["image_embeds"].shape[0] for piece in cached]
    leaves = {key: torch.cat([piece[key] for piece in cached]).requires_grad_() for key in cached[0]}
    ((name, embedding_loss),) = embedding_losses(leaves, dp_group, train.siglip_exchange).items()
    weighted = getattr(train.loss_weights, name) * embedding_loss  # the whole batch's: not divided by the count
    weighted.backward()
    grads = {key: leaf.grad.split(rows) for key, leaf in leaves.items()}

    # Second pass: each microbatch with a graph, its embeddings' gradient injected through (embeds * grad).sum().
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(microbatches):
        with _replayed_rng(states[i], device):
            outputs = forward(batch)
        injected = sum((outputs[key] * grads[key][i]).sum() for key in grads)
        others = {key: value for key, value in outputs.items() if key not in EMBEDDING_OUTPUTS}
        loss, parts = total_loss(others, train.loss_weights, dp_group, train.siglip_exchange)
        yield injected + loss / count
        _add(sums, {"loss": torch.as_tensor(loss, device=device).detach(), **parts})
    logged.update({key: value / count for key, value in sums.items()})
    logged[name] = embedding_loss.detach().float()
    logged["loss"] = logged["loss"] + weighted.detach().float()


def _add(sums: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Add `values` into `sums` as fp32 plain tensors (a tensor-parallel loss may be a replicated DTensor)."""
    for name, value in values.items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        sums[name] = sums.get(name, 0.0) + value.float()


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU generator's state and, on an accelerator, that device's."""
    accelerator = None if device.type == "cpu" else torch.get_device_module(device).get_rng_state(device)
    return torch.get_rng_state(), accelerator


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    cpu, accelerator = state
    torch.set_rng_state(cpu)
    if accelerator is not None:
        torch.get_device_module(device).set_rng_state(accelerator, device)


@contextlib.contextmanager
def _replayed_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> Iterator[None]:
    """Run the block from the RNG `state`; torch's fork_rng puts back the state it started from."""
    accelerators = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=accelerators, device_type=device.type):
        _set_rng_state(state, device)
        yield
