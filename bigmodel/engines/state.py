"""The native engines' state in the layout-independent form that checkpoints store (bigmodel.checkpoint.sharded):
the model parts' tensors under the unsplit model's names, and AdamW's state in the flattened form of torch's
`get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)`.

Built from the modules' own `state_dict()` and the optimizer's state directly: bigmodel's models keep their parameter
names in every layout (no wrapper adds a prefix: FSDP2 and compile work in place), which torch's helpers otherwise
establish name by name, a large part of loading a small checkpoint (docs/benchmarks.md, row g).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from bigmodel.checkpoint.records import HYPER_PREFIX, packed_hyperparameters

IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")
"""Optimizer settings that choose how the update runs, not what it computes. Each layout picks its own (ZeRO-3 runs
AdamW foreach over its shards, a pipeline stage per tensor), so a checkpoint's never replace the live optimizer's."""


def model_state(parts: list[nn.Module]) -> dict[str, Any]:
    """The tensors of every module of `parts` by name: this rank's shards (DTensors under tensor parallelism and
    FSDP) or whole tensors, sharing storage with the model, so `dcp.load` into them loads in place."""
    state: dict[str, Any] = {}
    for module in parts:
        state.update(module.state_dict())
    return state


def load_model_state(parts: list[nn.Module], state: dict[str, Any]) -> None:
    """Put `state` (model_state's form, any layout) into `parts`. Tensors that `dcp.load` filled in place (those of
    model_state) are already the model's; any other is copied in by the module's `load_state_dict`."""
    for module in parts:
        live = module.state_dict()
        given = {name: state[name] for name in live}
        if not all(_same_memory(given[name], tensor) for name, tensor in live.items()):
            module.load_state_dict(given)


def _same_memory(a: Any, b: torch.Tensor) -> bool:
    """Whether `a` is a tensor viewing exactly `b`'s elements (DTensors: their local tensors)."""
    if not isinstance(a, torch.Tensor) or type(a) is not type(b):
        return False
    if isinstance(a, DTensor):
        a, b = a.to_local(), b.to_local()
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _named_params(parts: list[nn.Module]) -> dict[int, str]:
    return {id(p): name for part in parts for name, p in part.named_parameters()}


def parts_optimizer_state(
    parts: list[nn.Module], optimizer: torch.optim.Optimizer, packed: bool = False
) -> dict[str, Any]:
    """The state of an AdamW over the model `parts` (every layout but ZeroOptimizer's stages 1 and 2) in the
    flattened form of `get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)`, which torch's helpers
    build for one module only. The moments are the optimizer's own tensors (DTensors where the parameters are);
    before the first step they are zeros and step 0, so the form never depends on when it is taken.

    packed: the hyper-parameters as `pack_hyperparameters` would pack them, made once per group rather than split
    into ~12 items per parameter and joined again."""
    names = _named_params(parts)
    flat: dict[str, Any] = {}
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        record = packed_hyperparameters(tuple(hyper.items())) if packed else None
        for param in group["params"]:
            name, state = names[id(param)], optimizer.state.get(param, {})
            flat[f"state.{name}.step"] = state.get("step", torch.tensor(0.0)).detach().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                flat[f"state.{name}.{key}"] = state[key] if key in state else torch.zeros_like(param)
            if packed:
                flat[HYPER_PREFIX + name] = record
            else:
                flat.update({f"{HYPER_PREFIX}{name}.{k}": v for k, v in hyper.items()})
    return flat


@torch.no_grad()
def load_parts_optimizer_state(parts: list[nn.Module], optimizer: torch.optim.Optimizer, flat: dict[str, Any]) -> None:
    """Restore parts_optimizer_state's form (saved in any layout) into the AdamW `optimizer` over `parts`. The moments
    become the optimizer's state as they are (`dcp.load` filled those of parts_optimizer_state in place)."""
    names = _named_params(parts)
    for group in optimizer.param_groups:
        on_device = group.get("capturable") or group.get("fused")  # as torch's Optimizer.load_state_dict places it
        for param in group["params"]:
            name = names[id(param)]
            step = torch.as_tensor(flat[f"state.{name}.step"]).detach().clone().float()
            optimizer.state[param] = {
                "step": step.to(param.device) if on_device else step,
                **{key: flat[f"state.{name}.{key}"] for key in ("exp_avg", "exp_avg_sq")},
            }
        if group["params"]:  # hyper-parameters are per group: its first parameter's saved values stand for all
            first = names[id(group["params"][0])]
            for key in group.keys() - {"params"}:
                group[key] = flat[f"{HYPER_PREFIX}{first}.{key}"]
