"""Model-state memory per rank: what parameters, gradients and optimizer state occupy, measured and in theory.

ZeRO's accounting (Rajbhandari et al., 2020) for Psi parameters and AdamW in fp32: parameters 4 Psi bytes,
gradients 4 Psi, optimizer state (exp_avg, exp_avg_sq) 8 Psi. Stage 1 shards the optimizer state over the dp
ranks, stage 2 also the gradients, stage 3 also the parameters. Activations and temporary buffers are not model
state and are not counted.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from bigmodel.parallel.data_parallel import ZeroOptimizer, local_tensor


def zero_theory_bytes(
    num_params_local: int, dp: int, stage: int, bytes_per_param: int = 4, optimizer_states: int = 2
) -> dict[str, float]:
    """Bytes per rank of params, grads and optimizer state under ZeRO `stage` (0-3) over `dp` sharding ranks.

    `num_params_local` is the parameter count a rank would hold without data-parallel sharding (with tensor
    parallelism: its tensor-parallel shard). `dp` is the size of the group the state is sharded over (for HSDP,
    dp_shard). `optimizer_states` tensors of `bytes_per_param` each per parameter (2 for Adam).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if dp < 1 or num_params_local < 0:
        raise ValueError(f"need dp >= 1 and num_params_local >= 0, got dp={dp}, num_params_local={num_params_local}")
    full = num_params_local * bytes_per_param
    return {
        "params": full / (dp if stage >= 3 else 1),
        "grads": full / (dp if stage >= 2 else 1),
        "optimizer": optimizer_states * full / (dp if stage >= 1 else 1),
    }


def model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | ZeroOptimizer) -> dict[str, int]:
    """Bytes this rank stores for params, grads and optimizer state of `model` trained by `optimizer`.

    Counts storages, each once, in that order: a DTensor by its local tensor, a view by the storage it lives in (so
    ZeRO's owned chunks, views into the parameters and gradients, add nothing, and chunks in a reduced bucket count
    that bucket once). Measure after the gradient sync and before zero_grad.
    """
    inner = optimizer.optimizer if isinstance(optimizer, ZeroOptimizer) else optimizer
    params = [p for group in inner.param_groups for p in group["params"]]
    seen: set[int] = set()
    return {
        "params": _storage_bytes(list(model.parameters()) + params, seen),
        "grads": _storage_bytes([p.grad for p in [*model.parameters(), *params] if p.grad is not None], seen),
        "optimizer": _storage_bytes([t for state in inner.state.values() for t in state.values()], seen),
    }


def _storage_bytes(tensors: Iterable[object], seen: set[int]) -> int:
    """Bytes of the storages behind `tensors` not yet in `seen` (storage addresses), adding them to it."""
    total = 0
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            continue
        storage = local_tensor(tensor).untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
