"""Activation memory measured: the bytes autograd saves for backward during one forward of the model."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def saved_activation_bytes(model: nn.Module, batch: dict[str, torch.Tensor], bf16: bool = False) -> int:
    """Bytes of the distinct storages autograd keeps for backward after `model(batch)` (parameters excluded; the
    bf16 copies autocast makes of them included, as they are saved per forward)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(batch)
    return sum(seen.values())
