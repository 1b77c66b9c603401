"""The recipe that turns the plain model into its parallel layout, in one fixed order:
tensor (and sequence) parallel -> materialise and initialise -> lock towers -> activation checkpointing -> compile ->
FSDP (ZeRO-3).

ZeRO stages 0-2 do not touch the model; they live in the optimizer wrapper (`bigmodel.parallel.data_parallel`).
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from bigmodel.config.schema import Config
from bigmodel.models.encoder import MultimodalEncoder
from bigmodel.models.locking import lock_towers
from bigmodel.parallel.context import ParallelContext
from bigmodel.parallel.fsdp import apply_fsdp
from bigmodel.parallel.init import materialize_model
from bigmodel.parallel.tensor_parallel import apply_tensor_parallel


def build_parallel_model(cfg: Config, ctx: ParallelContext, objectives: Collection[str]) -> MultimodalEncoder:
    """The model of `cfg` laid out as `ctx` says, with identical initial weights in every layout.

    Every process of the job calls this. The model is built on the meta device, so no rank ever holds more than
    its share of the weights plus one full parameter at a time.
    """
    with torch.device("meta"):
        model = MultimodalEncoder(cfg.model, objectives)
    return parallelize_module_parts(model, cfg, ctx)


def parallelize_module_parts(model: MultimodalEncoder, cfg: Config, ctx: ParallelContext) -> MultimodalEncoder:
    """Lay out `model` (the whole encoder or one pipeline stage of it, on the meta device) in place and return it."""
    dims = ctx.dims
    if dims.tp > 1:
        apply_tensor_parallel(model, ctx.meshes.tp, sequence_parallel=dims.sp)
    materialize_model(model, cfg.train.seed, ctx.device)
    # Before FSDP: fully_shard records which parameters need gradients (frozen ones get no reduce-scatter).
    lock_towers(model, cfg.train)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    if cfg.train.compile:
        apply_compile(model, whole_model=dims.tp > 1, backend=cfg.train.compile_backend)
    if dims.zero_stage == 3:
        apply_fsdp(model, ctx.meshes.fsdp, cfg.parallel.reshard_after_forward, cfg.parallel.gloo_transport)
    return model


def apply_compile(model: MultimodalEncoder, whole_model: bool, backend: str) -> None:
    """torch.compile in place, keeping parameter names: every block separately (identical blocks share compiled
    code), or the whole forward at once, which tensor parallelism needs in torch 2.13 (per-block compile fails in
    backward there with DTensor inputs)."""
    if whole_model:
        model.compile(backend=backend)
        return
    for stack in model.block_stacks():
        for block in stack.layers.values():
            block.compile(backend=backend)
