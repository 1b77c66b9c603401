"""Tensor (and sequence) parallel MultimodalEncoder against a single-process reference with the same seed.

All processes form one tp mesh and feed the same batch. For every fusion kind, with and without sequence
parallelism (and once with activation checkpointing), each rank builds the reference model itself (no
collectives), builds the same model on the meta device, parallelises and materialises it, then compares weights,
loss parts, gradients and the parameters after one SGD step. Deviations are maxed over ranks; other entries are
rank 0's. Rank 0 writes the results as JSON to --out.

Usage: torchrun --nproc-per-node=TP tp_worker.py --out OUT [--fsdp] [--model.key=value ...] (config overrides).
With --fsdp (4 processes), also checks dp_shard=2 x tp=2 with FSDP2 applied after materialisation (with sequence
parallelism) and before it (without).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from bigmodel.config import load_config
from bigmodel.data import build_train_loader
from bigmodel.losses import active_objectives, total_loss
from bigmodel.models import MultimodalEncoder, build_model
from bigmodel.parallel.env import exit_distributed
from bigmodel.parallel.init import materialize_model
from bigmodel.parallel.tensor_parallel import apply_tensor_parallel, loss_context

TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"
SEED = 3
LR = 0.5
FUSION_OVERRIDES = {
    "cross": ["--model.fusion=cross"],
    "merged": ["--model.fusion=merged"],
    # Without fusion only the contrastive objective has something to train.
    "none": [
        "--model.fusion=none",
        "--model.fusion_layers=0",
        "--train.loss_weights.itm=0",
        "--train.loss_weights.mlm=0",
    ],
}

LAYOUTS = [(fusion, sp, False) for fusion in FUSION_OVERRIDES for sp in (False, True)] + [("cross", True, True)]
"""(fusion, sequence parallel, activation checkpointing) of each checked layout."""


def full(t: torch.Tensor) -> torch.Tensor:
    """The global value of a parameter or gradient, whether DTensor or plain."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def deviations(model: torch.nn.Module, reference: torch.nn.Module, grads: bool = False) -> tuple[float, str]:
    """The largest max|mine - reference| over parameters (of values, or of gradients) and the parameter's name."""
    ref = dict(reference.named_parameters())
    worst, worst_name = 0.0, ""
    for name, param in model.named_parameters():
        mine, theirs = (param.grad, ref[name].grad) if grads else (param, ref[name])
        dev = (full(mine.detach()) - theirs).abs().max().item()
        if dev > worst:
            worst, worst_name = dev, name
    return worst, worst_name


def step(model: torch.nn.Module, batch: dict, cfg, tp: bool) -> dict[str, float]:
    """Forward, loss, backward and one SGD step; the loss parts (plain tensors, also under TP) as floats."""
    with loss_context(tp):
        outputs = model(batch)
        loss, parts = total_loss(outputs, cfg.train.loss_weights)
        loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return {name: value.item() for name, value in parts.items()} | {"total": loss.item()}


def compare(model: torch.nn.Module, reference: torch.nn.Module, batch: dict, cfg) -> dict:
    """Weights, loss parts, gradients and parameters after one SGD step of `model` against `reference`."""
    weights_dev, _ = deviations(model, reference)
    ref_parts = step(reference, batch, cfg, tp=False)
    parts = step(model, batch, cfg, tp=True)
    # `step` leaves the gradients in place, so they can still be compared after the SGD update.
    grad_dev, worst_grad = deviations(model, reference, grads=True)
    return {
        "weights_dev": weights_dev,
        "loss_rel_dev": {k: abs(parts[k] - ref_parts[k]) / abs(ref_parts[k]) for k in ref_parts},
        "losses": ref_parts,
        "grad_dev": grad_dev,
        "worst_grad": worst_grad,
        "grad_scale": max(p.grad.abs().max().item() for p in reference.parameters()),
        "step_dev": deviations(model, reference)[0],
    }


def build(cfg, objectives, tp_mesh, sequence_parallel: bool) -> MultimodalEncoder:
    """The model as a parallel job builds it: on the meta device, parallelised, then materialised."""
    with torch.device("meta"):
        model = MultimodalEncoder(cfg.model, objectives)
    apply_tensor_parallel(model, tp_mesh, sequence_parallel)
    materialize_model(model, SEED, "cpu")
    return model


def layout_check(overrides: list[str], fusion: str, sequence_parallel: bool, checkpointing: bool, tp_mesh) -> dict:
    """One layout against the reference, plus what shows the layout is really in effect: each parameter's
    placements, the MLM logits' placements and the residual stream entering the first vision block."""
    cfg = load_config(TINY, [*overrides, *FUSION_OVERRIDES[fusion]])
    objectives = active_objectives(cfg.train.loss_weights)
    batch = next(iter(build_train_loader(cfg, 0, 1)))
    reference = build_model(cfg.model, objectives, SEED)
    model = build(cfg, objectives, tp_mesh, sequence_parallel)
    model.set_activation_checkpointing(checkpointing)

    stream = {}
    probe = model.vision.blocks.layers["0"].layer_norm1.register_forward_pre_hook(
        lambda _, args: stream.setdefault("x", args[0])
    )
    result = compare(model, reference, batch, cfg)
    probe.remove()
    x = stream["x"]
    local_lengths = [None] * dist.get_world_size()
    dist.all_gather_object(local_lengths, (x.to_local() if isinstance(x, DTensor) else x).shape[1])
    result["vision_stream"] = {
        "placements": [str(p) for p in x.placements] if isinstance(x, DTensor) else None,
        "local_lengths": local_lengths,
        "length": x.shape[1],
    }
    result["placements"] = {
        name: [str(p) for p in param.placements] if isinstance(param, DTensor) else None
        for name, param in model.named_parameters()
    }
    if "mlm" in objectives:
        with loss_context(True):
            result["mlm_logits_placements"] = [str(p) for p in model(batch)["mlm_logits"].placements]
    return result


def fsdp_check(overrides: list[str], sequence_parallel: bool, shard_first: bool) -> dict:
    """dp_shard=2 x tp=2 with FSDP2 on the dp axis, applied after materialisation (or before it with
    `shard_first`). Both dp ranks feed the whole batch, so the dp-averaged gradients equal the reference's."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    cfg = load_config(TINY, [*overrides, *FUSION_OVERRIDES["cross"]])
    objectives = active_objectives(cfg.train.loss_weights)
    batch = next(iter(build_train_loader(cfg, 0, 1)))
    reference = build_model(cfg.model, objectives, SEED)
    with torch.device("meta"):
        model = MultimodalEncoder(cfg.model, objectives)
    apply_tensor_parallel(model, mesh["tp"], sequence_parallel)
    if not shard_first:
        materialize_model(model, SEED, "cpu")
    for stack in model.block_stacks():
        for block in stack.layers.values():
            fully_shard(block, mesh=mesh["dp_shard"])
    fully_shard(model, mesh=mesh["dp_shard"])
    if shard_first:
        materialize_model(model, SEED, "cpu")
    return compare(model, reference, batch, cfg)


def max_over_ranks(results):
    """Replace every float in `results` by its maximum over ranks (all ranks hold the same structure)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)

    def merge(values):
        if isinstance(values[0], dict):
            return {k: merge([v[k] for v in values]) for k in values[0]}
        return max(values) if isinstance(values[0], float) else values[0]

    return merge(gathered)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--fsdp", action="store_true")
    args, overrides = parser.parse_known_args()
    dist.init_process_group("gloo")
    tp_mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    results: dict = {"layouts": {}}
    for fusion, sequence_parallel, checkpointing in LAYOUTS:
        key = fusion + ("-sp" if sequence_parallel else "") + ("-ac" if checkpointing else "")
        results["layouts"][key] = layout_check(overrides, fusion, sequence_parallel, checkpointing, tp_mesh)
    if args.fsdp:
        results["fsdp-sp"] = fsdp_check(overrides, sequence_parallel=True, shard_first=False)
        results["fsdp-shard-first"] = fsdp_check(overrides, sequence_parallel=False, shard_first=True)
    results = max_over_ranks(results)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    exit_distributed(0)


if __name__ == "__main__":
    main()
