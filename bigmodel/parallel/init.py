"""Materialising a model built on the meta device and parallelised: every layout starts from the same weights."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from bigmodel.models.encoder import MultimodalEncoder
from bigmodel.models.init import initial_values


@torch.no_grad()
def materialize_model(model: MultimodalEncoder, seed: int, device: torch.device | str) -> None:
    """Allocate `model`'s parameters on `device` and fill them from `seed`, in place.

    `model` is built on the meta device and possibly tensor-parallelised (and possibly already FSDP2-sharded).
    Each parameter's full value comes from `bigmodel.models.init.initial_values`, which depends only on the seed
    and the parameter's name; a DTensor parameter keeps this rank's shard of it. The weights therefore equal
    `build_model(cfg, objectives, seed)` in one process, whatever the layout. Needs no communication: every rank
    computes the full values and slices out its own part, so all ranks of the model's meshes must call it.
    """
    model.to_empty(device=device)
    for _, param, value in initial_values(model, seed):
        value = value.to(device=device, dtype=param.dtype)
        if isinstance(param, DTensor):
            # src_data_rank=None: take the local slice of this rank's own (identical) full value, no scatter.
            shard = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(value)
