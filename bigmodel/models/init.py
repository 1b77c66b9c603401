"""Building the model on the meta device and initialising it from a seed.

Each parameter is drawn from its own generator, seeded by (seed, parameter name). A parameter's initial value
therefore depends only on the seed and its name: not on the order modules are visited, not on which other
parameters exist, and not on how a later parallel layout splits the model. Every layout starts from the same
weights.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Collection, Iterator

import torch
from torch import nn

from bigmodel.config.schema import ModelConfig
from bigmodel.models.encoder import DEFAULT_OBJECTIVES, MultimodalEncoder


def param_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by the run seed and a stable hash of the parameter's qualified name."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def is_residual_output(module_name: str) -> bool:
    """Whether the linear layer `module_name` writes into the residual stream (attention out_proj, MLP fc2)."""
    return module_name.endswith(("out_proj", "mlp.fc2"))


def initial_value(
    module: nn.Module, param_name: str, shape: torch.Size, cfg: ModelConfig, gen: torch.Generator, residual: bool
) -> torch.Tensor:
    """The fp32 initial value of `module.<param_name>` (a direct parameter of `module`); `residual`: the module
    writes into the residual stream (`is_residual_output`)."""
    if isinstance(module, nn.LayerNorm):
        return torch.ones(shape) if param_name == "weight" else torch.zeros(shape)
    if param_name == "bias":
        return torch.zeros(shape)
    if param_name in ("logit_scale", "logit_bias"):
        return torch.full(shape, getattr(module, f"initial_{param_name}"))
    std = cfg.init_std
    if isinstance(module, nn.Linear | nn.Conv2d) and param_name == "weight":
        # Residual output projections are scaled down with depth (GPT-2) so the residual stream's variance does not
        # grow with the number of blocks.
        depth = max(cfg.vision_layers, cfg.text_layers + cfg.fusion_layers)
        if residual:
            std = std / math.sqrt(2 * depth)
    return torch.randn(shape, generator=gen) * std


def initial_values(model: MultimodalEncoder, seed: int) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
    """(qualified name, parameter, full fp32 initial value) for every parameter of `model`.

    The value has the parameter's global shape, so a parallel layout can take its own shard of it.
    """
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            generator = param_generator(seed, full_name)
            residual = is_residual_output(module_name)
            value = initial_value(module, param_name, param.shape, model.cfg, generator, residual)
            yield full_name, param, value


@torch.no_grad()
def init_weights(model: MultimodalEncoder, seed: int, device: torch.device | str = "cpu") -> MultimodalEncoder:
    """Materialise `model` (possibly on the meta device) on `device` and fill every parameter from (seed, name)."""
    model.to_empty(device=device)
    for _, param, value in initial_values(model, seed):
        param.copy_(value.to(param.dtype))
    return model


def build_model(cfg: ModelConfig, objectives: Collection[str] = DEFAULT_OBJECTIVES, seed: int = 0, device="cpu"):
    """A MultimodalEncoder built on the meta device, then materialised on `device` and initialised from `seed`."""
    with torch.device("meta"):
        model = MultimodalEncoder(cfg, objectives)
    return init_weights(model, seed, device)
