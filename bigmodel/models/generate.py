"""Greedy captioning with a CoCa-style model (`train.loss_weights.caption`): plain single-device decoding."""

from __future__ import annotations

import torch

from bigmodel.models.encoder import MultimodalEncoder


@torch.no_grad()
def greedy_captions(
    model: MultimodalEncoder, pixel_values: torch.Tensor, bos_id: int, eos_id: int, max_tokens: int | None = None
) -> list[list[int]]:
    """The most likely next token, appended one at a time, for each image of pixel_values (B, C, H, W).

    Decoding starts from `bos_id` and stops per image at `eos_id`, after `max_tokens` tokens (None: no limit), or
    when the prefix fills model.context_length. Returns the generated ids of each image, BOS and EOS left out.
    `model` needs a caption head; put it in eval mode first (dropout). Each step reruns the whole prefix (no
    key/value cache): captions are short, and this keeps decoding on the training forward's code.
    """
    if "caption" not in model.objectives:
        raise ValueError("the model has no caption head; train with train.loss_weights.caption > 0")
    steps = model.cfg.context_length - 1  # BOS takes one position
    steps = steps if max_tokens is None else min(max_tokens, steps)
    image = model.vision(pixel_values)  # (B, 1 + N, Dv)
    ids = torch.full((pixel_values.shape[0], 1), bos_id, dtype=torch.long, device=pixel_values.device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(steps):
        token = model.decode(image, ids)[:, -1].argmax(-1)  # (B,)
        token = torch.where(done, eos_id, token)  # finished rows only pad with EOS
        ids = torch.cat([ids, token[:, None]], dim=1)
        done |= token == eos_id
        if done.all():
            break
    captions = []
    for row in ids[:, 1:].tolist():
        captions.append(row[: row.index(eos_id)] if eos_id in row else row)
    return captions
