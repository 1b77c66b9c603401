"""ZeRO stages 0-3, HSDP and tensor parallelism composed with each, against a single-process reference.

Started by tests/distributed/parallel/test_zero.py under torchrun with `--suite dp2` (2 processes) or `--suite dp4`
(4 processes). Every rank trains the reference model (same seed) on the whole global batch, then each layout of the
suite on its own slice of that batch, and measures per rank: losses, step-1 gradients, global gradient norms and
parameters after the steps against the reference, the lr the scheduler set, and model-state bytes against ZeRO's
theory. Rank 0 writes every rank's measurements to --out as JSON; the test asserts on them.

The loss is image-text matching only: a mean over equally many pairs on every rank, so the mean of the ranks'
losses is the loss of the global batch (contrastive and MLM need cross-rank normalisation that lives elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from bigmodel.config import load_config
from bigmodel.data import build_train_loader
from bigmodel.losses import active_objectives, total_loss
from bigmodel.models import build_model
from bigmodel.optim import build_optimizer, build_scheduler
from bigmodel.parallel.data_parallel import ZeroOptimizer, local_tensor
from bigmodel.parallel.dims import ParallelDims
from bigmodel.parallel.env import exit_distributed, init_distributed, read_dist_env
from bigmodel.parallel.fsdp import apply_fsdp
from bigmodel.parallel.grad_norm import clip_grad_norm_
from bigmodel.parallel.memory import model_state_bytes, zero_theory_bytes

ROOT = Path(__file__).resolve().parents[3]
STEPS = 4
# Below the reference's gradient norm at every step (0.19, 1.17, 0.79, 0.087), so clipping scales every step.
MAX_NORM = 0.05


@dataclass(frozen=True)
class Layout:
    name: str
    stage: int
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    activation_checkpointing: bool = False
    bucket_mb: float = 25.0
    """Stages 0-2: bucket size; 0.02 splits the tiny model into many buckets."""
    round_trip: bool = False
    """Stages 1-2 only: also check that the optimizer state_dict restores into a new optimizer."""
    reshard_after_forward: bool = True
    """Stage 3 only: parallel.reshard_after_forward (false keeps gathered parameters from forward to backward)."""


SUITES = {
    "dp2": [
        Layout("zero0", 0, dp_shard=2),
        Layout("zero1", 1, dp_shard=2, round_trip=True),
        Layout("zero2", 2, dp_shard=2, round_trip=True),
        Layout("zero3", 3, dp_shard=2),
        Layout("zero3_checkpointed", 3, dp_shard=2, activation_checkpointing=True),
        Layout("zero3_keep_gathered", 3, dp_shard=2, reshard_after_forward=False),
    ],
    "dp4": [
        Layout("zero1_dp4", 1, dp_shard=4, bucket_mb=0.02),
        Layout("zero2_dp4", 2, dp_shard=4, bucket_mb=0.02),
        Layout("zero3_dp4", 3, dp_shard=4),
        Layout("hsdp_2x2", 3, dp_replicate=2, dp_shard=2),
        Layout("zero0_tp2", 0, dp_shard=2, tp=2),
        Layout("zero1_tp2", 1, dp_shard=2, tp=2),
        Layout("zero2_tp2", 2, dp_shard=2, tp=2),
        Layout("zero3_tp2", 3, dp_shard=2, tp=2),
    ],
}


def tiny_itm_config():
    return load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            "--train.loss_weights.contrastive=0",
            "--train.loss_weights.mlm=0",
            f"--train.grad_clip={MAX_NORM}",
            "--log.wandb=disabled",
        ],
    )


def new_model(cfg):
    return build_model(cfg.model, active_objectives(cfg.train.loss_weights), cfg.train.seed)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()


def reference_run(cfg, splits: int = 1) -> dict:
    """The single-process run on the whole global batch: losses, norms, lrs, step-1 grads, final params.

    With `splits` > 1 each global batch is accumulated from the `splits` slices data-parallel ranks would get: the
    same mathematics, with the same split of the fp32 arithmetic as a layout with dp = splits, but no communication.
    """
    model = new_model(cfg)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    out = {"loss": [], "norm": [], "lr": []}
    slices = zip(*(build_train_loader(cfg, r, splits) for r in range(splits)), strict=False)
    for step, batches in zip(range(STEPS), slices, strict=False):
        loss = 0.0
        for batch in batches:
            part, _ = total_loss(model(batch), cfg.train.loss_weights)
            (part / splits).backward()
            loss = loss + part.detach() / splits
        if step == 0:
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        out["norm"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip).item())
        out["loss"].append(loss.item())
        out["lr"].append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def apply_tp_toy(model, tp_mesh) -> None:
    """Megatron-style MLPs: fc1 column-parallel, fc2 row-parallel, in every block (the rest stays replicated)."""
    for stack in model.block_stacks():
        for block in stack.layers.values():
            parallelize_module(block.mlp, tp_mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})


def build_layout(cfg, layout: Layout):
    """(model, optimizer, scheduler, dp mesh, params per rank before data-parallel sharding) of `layout`."""
    dims = ParallelDims(layout.dp_replicate, layout.dp_shard, layout.tp, zero_stage=layout.stage)
    meshes = dims.build_meshes("cpu")
    model = new_model(cfg)
    if layout.tp > 1:
        apply_tp_toy(model, meshes.tp)
    model.set_activation_checkpointing(layout.activation_checkpointing)
    num_local = sum(local_tensor(p).numel() for p in model.parameters())
    if layout.stage == 3:
        apply_fsdp(model, meshes.fsdp, layout.reshard_after_forward)
        optimizer = build_optimizer(model, cfg.train, foreach=True)  # as NativeEngine over FSDP's shards
        scheduler = build_scheduler(optimizer, cfg.train)
    else:
        optimizer = ZeroOptimizer(model, cfg.train, meshes.dp, layout.stage, layout.bucket_mb)
        scheduler = build_scheduler(optimizer.optimizer, cfg.train)
    return model, optimizer, scheduler, meshes.dp, num_local


def train_step(cfg, model, optimizer, batch, dp_mesh, record: dict | None = None) -> None:
    """One step in the engine's order: forward/backward, sync, clip, step, (measure), zero_grad."""
    loss, _ = total_loss(model(batch), cfg.train.loss_weights)
    loss.backward()
    zero = isinstance(optimizer, ZeroOptimizer)
    if zero:
        optimizer.sync_gradients()
    if record is not None and not record["grads"]:
        if zero:
            record["grads"] = optimizer.full_gradients()
        else:
            record["grads"] = {n: full(p.grad) for n, p in model.named_parameters()}
    if zero:
        norm = optimizer.clip_grad_norm_(cfg.train.grad_clip)
    else:
        norm = clip_grad_norm_([p.grad for p in model.parameters() if p.grad is not None], cfg.train.grad_clip)
    if record is not None:
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, group=dp_mesh.get_group())
        record["loss"].append(global_loss.item() / dp_mesh.size())
        record["norm"].append(norm.item())
        record["lr"].append(optimizer.param_groups[0]["lr"])
    optimizer.step()
    if record is not None and "memory" not in record:
        # After the first step AdamW's state exists; the gradients are still there until zero_grad.
        record["memory"] = model_state_bytes(model, optimizer)
    optimizer.zero_grad()


def relative_l2(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(||got - want|| / ||want|| over all tensors together, max |got - want| over all elements)."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    diff = sum((got[n] - want[n]).double().square().sum() for n in want)
    norm = sum(want[n].double().square().sum() for n in want)
    worst = max((got[n] - want[n]).abs().max().item() for n in want)
    return (diff / norm).sqrt().item(), worst


def run_layout(cfg, layout: Layout, ref: dict, split_ref: dict) -> dict:
    """Train `layout` and measure it against `ref` (whole batch) and `split_ref` (the same dp split, one process)."""
    started = time.perf_counter()
    model, optimizer, scheduler, dp_mesh, num_local = build_layout(cfg, layout)
    loader = build_train_loader(cfg, dp_mesh.get_local_rank(), dp_mesh.size())
    record = {"loss": [], "norm": [], "lr": [], "grads": {}}
    for batch in itertools.islice(loader, STEPS):
        train_step(cfg, model, optimizer, batch, dp_mesh, record)
        scheduler.step()
    params = {n: full(p) for n, p in model.named_parameters()}
    grad_rel, grad_max = relative_l2(record["grads"], ref["grads"])
    full_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in record["grads"].values()])).item()
    _, param_max = relative_l2(params, ref["params"])
    shard_dp = layout.dp_shard if layout.stage == 3 else dp_mesh.size()
    result = {
        **asdict(layout),
        "norm_rel_steps": [abs(a - b) / b for a, b in zip(record["norm"], ref["norm"], strict=True)],
        "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(record["loss"], ref["loss"], strict=True)),
        "norm_rel": max(abs(a - b) / b for a, b in zip(record["norm"], ref["norm"], strict=True)),
        "lr_equal": record["lr"] == ref["lr"],
        "grad_rel": grad_rel,
        "grad_max_abs": grad_max,
        "grad_rel_split": relative_l2(record["grads"], split_ref["grads"])[0],
        "norm_vs_full_grads_rel": abs(record["norm"][0] - full_norm) / full_norm,
        "param_max_abs": param_max,
        "memory": record["memory"],
        "theory": zero_theory_bytes(num_local, shard_dp, layout.stage),
    }
    if layout.round_trip:
        result["round_trip_max_abs"] = state_dict_round_trip(cfg, model, optimizer, dp_mesh, loader)
    if isinstance(optimizer, ZeroOptimizer):
        result["buckets"] = len(optimizer.buckets)
    result["seconds"] = time.perf_counter() - started
    return result


def state_dict_round_trip(cfg, model, optimizer: ZeroOptimizer, dp_mesh, loader) -> float:
    """Restore the optimizer's state_dict into a new ZeroOptimizer over a copy of the model, take one more step
    with both, and return the largest parameter difference (0 when the state restored exactly)."""
    twin = copy.deepcopy(model)
    restored = ZeroOptimizer(twin, cfg.train, dp_mesh, optimizer.stage)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    batch = next(iter(loader))
    for m, opt in ((model, optimizer), (twin, restored)):
        train_step(cfg, m, opt, batch, dp_mesh)
    return max((p - q).abs().max().item() for p, q in zip(model.parameters(), twin.parameters(), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    args = parser.parse_args()
    init_distributed(read_dist_env(), backend="gloo")
    torch.manual_seed(0)
    cfg = tiny_itm_config()
    started = time.perf_counter()
    layouts = SUITES[args.suite]
    refs = {dp: reference_run(cfg, dp) for dp in sorted({1} | {lay.dp_replicate * lay.dp_shard for lay in layouts})}
    results = {"reference_seconds": time.perf_counter() - started, "reference_norms": refs[1]["norm"]}
    results["max_norm"] = MAX_NORM
    results["layouts"] = [run_layout(cfg, lay, refs[1], refs[lay.dp_replicate * lay.dp_shard]) for lay in layouts]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(gathered, indent=1))
    exit_distributed(0)


if __name__ == "__main__":
    main()
