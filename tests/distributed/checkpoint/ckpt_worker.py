"""Sharded checkpoints across layouts, started by tests/distributed/checkpoint/test_sharded.py on 4 processes.

Trains the tiny model 2 steps at dp2 x tp2 with ZeRO-1 and saves a sharded checkpoint to --ckpt. Then, for each
layout of LOADS, builds a fresh engine, measures how far its whole (gathered) state is from the saved one before
loading (it must be far: the check could not pass by accident) and after loading (expected exactly 0). The
same-layout load also continues one step next to the original engine, on the same batch. Rank 0 writes the
measurements to --out as JSON and the saved whole state to <ckpt>.state.pt for the single-process check.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from bigmodel.checkpoint.records import read_plain_record
from bigmodel.checkpoint.sharded import load_sharded, save_sharded
from bigmodel.config import load_config
from bigmodel.data import build_train_loader
from bigmodel.engines import build_engine
from bigmodel.engines.state import IMPLEMENTATION_KEYS
from bigmodel.parallel.context import setup_parallel
from bigmodel.parallel.env import exit_distributed
from bigmodel.train.loop import split_microbatches

ROOT = Path(__file__).resolve().parents[3]
SAVE_LAYOUT = {"dp_shard": 2, "tp": 2, "zero_stage": 1}
LOADS = {
    "dp2_tp2_zero1": SAVE_LAYOUT,
    "dp4_zero3": {"dp_shard": 4, "tp": 1, "zero_stage": 3},
    "tp2_dp2_zero0": {"dp_shard": 2, "tp": 2, "zero_stage": 0},
    # 4 chunks per parameter: one-element parameters (logit scale) leave ranks 1-3 with empty chunks.
    "dp4_zero2": {"dp_shard": 4, "tp": 1, "zero_stage": 2},
}


def build(layout: dict[str, int]):
    """(engine, loader) of the tiny config in `layout`, with the same initial weights in every layout."""
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml", ["--log.wandb=disabled", *(f"--parallel.{k}={v}" for k, v in layout.items())]
    )
    ctx = setup_parallel(cfg)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, ctx)
    return engine, iter(build_train_loader(cfg, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp))


def whole_state(engine) -> dict[str, object]:
    """The engine's model and optimizer state by name, tensors whole (gathered from their shards) and on CPU."""
    state = engine.state_dict()
    whole = {}
    for part in ("model", "optim"):
        for name, value in state[part].items():
            if isinstance(value, DTensor):
                value = value.full_tensor()
            whole[f"{part}.{name}"] = value.detach().clone().cpu() if torch.is_tensor(value) else value
    return whole


def hyperparameters(value: object) -> object:
    """A packed hyper-parameter item (read from its plain record) without the settings each layout picks for itself
    (foreach, ...); other values as they are."""
    if isinstance(value, bytes):
        value = read_plain_record(io.BytesIO(value), "hyper-parameters")
    if isinstance(value, tuple) and all(isinstance(pair, tuple) and len(pair) == 2 for pair in value):
        return {k: v for k, v in value if k not in IMPLEMENTATION_KEYS}
    return value


def deviation(got: dict[str, object], want: dict[str, object]) -> dict[str, object]:
    """Largest |difference| of the parameters, of AdamW's moments and of its step counts, and the names that differ
    otherwise (missing, extra, another shape, or an unequal hyper-parameter)."""
    worst = {"model": 0.0, "moments": 0.0, "step": 0.0}
    other = []
    for name, ref in want.items():
        value = got.get(name)
        if torch.is_tensor(ref) and torch.is_tensor(value) and value.shape == ref.shape:
            kind = "model" if name.startswith("model.") else "step" if name.endswith(".step") else "moments"
            worst[kind] = max(worst[kind], (value.float() - ref.float()).abs().max().item())
        elif torch.is_tensor(ref) or hyperparameters(value) != hyperparameters(ref):
            other.append(name)
    other += sorted(set(got) - set(want))
    return {**{f"{kind}_max_abs": value for kind, value in worst.items()}, "mismatched": other}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt", required=True)
    args = parser.parse_args()
    original, loader = build(SAVE_LAYOUT)
    for _ in range(2):
        original.train_step(split_microbatches(next(loader), 1))
    save_sharded(args.ckpt, original, {"step": 2, "samples": 32})
    saved = whole_state(original)
    results: dict[str, object] = {"keys": len(saved)}
    for name, layout in LOADS.items():
        engine, _ = build(layout)
        before = deviation(whole_state(engine), saved)
        extra = load_sharded(args.ckpt, engine)
        results[name] = {"before": before, "after": deviation(whole_state(engine), saved), "extra": extra}
        if layout == SAVE_LAYOUT:
            batch = split_microbatches(next(loader), 1)
            losses = [original.train_step(batch).loss, engine.train_step(batch).loss]
            results[name] |= {
                "continued_losses": losses,
                "continued": deviation(whole_state(engine), whole_state(original)),
            }
    if original.ctx.is_main:
        torch.save(saved, f"{args.ckpt}.state.pt")
        Path(args.out).write_text(json.dumps(results, indent=1))
    exit_distributed(0)


if __name__ == "__main__":
    main()
