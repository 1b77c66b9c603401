"""DeepSpeed-engine checkpoints, started by tests/distributed/engines/test_deepspeed.py on 2 processes.

For each ZeRO stage of --stages: train 2 steps of the tiny model under engine=deepspeed, saving after steps 1 and 2
through the engine's save_checkpoint with keep=1 (so `latest`, keep-N and the manifest are exercised),
record the engine's whole fp32 parameters and AdamW moments, then train 2 more steps. A fresh engine loads the
checkpoint through the engine's own load_checkpoint (what Trainer.resume calls) and trains the same 2 steps. Last,
an engine at another ZeRO stage tries to load the first checkpoint. Rank 0 writes the losses and errors to --out as
JSON and each stage's recorded tensors to <run>/saved_state.pt.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from bigmodel.config import config_to_dict, load_config
from bigmodel.data import build_train_loader
from bigmodel.engines import build_engine
from bigmodel.parallel.context import setup_parallel
from bigmodel.parallel.env import exit_distributed
from bigmodel.train.loop import split_microbatches

ROOT = Path(__file__).resolve().parents[3]
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build(stage: int, run_dir: Path):
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            "--log.wandb=disabled",
            "--engine=deepspeed",
            "--parallel.dp_shard=2",
            f"--parallel.zero_stage={stage}",
            "--deepspeed.param_persistence_threshold=0",  # partition every tensor of the tiny model at stage 3
            f"--train.out_dir={run_dir}",
        ],
    )
    ctx = setup_parallel(cfg)
    torch.manual_seed(cfg.train.seed)
    return cfg, build_engine(cfg, ctx), build_train_loader(cfg, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp)


def whole_state(engine) -> dict[str, torch.Tensor]:
    """`model.<name>` and, at ZeRO 0 and 3, `optim.state.<name>.exp_avg(_sq)`: whole fp32 tensors gathered from
    DeepSpeed (a collective at ZeRO 1-3), named as in bigmodel's sharded checkpoints. At ZeRO 1-2, DeepSpeed 0.19.8's
    safe_get_full_optimizer_state fails ("exp_avg not found in optimizer state fragment"); the test checks those
    moments against DeepSpeed's universal-checkpoint conversion instead."""
    from deepspeed.utils import safe_get_full_optimizer_state

    stage = engine.ds.zero_optimization_stage()
    state = {f"model.{name}": value for name, value in engine.full_parameters().items()}
    for name, param in engine.model.named_parameters():
        for kind in ("exp_avg", "exp_avg_sq") if stage in (0, 3) else ():
            if stage == 3:
                value = safe_get_full_optimizer_state(param, kind)
            else:  # torch's AdamW itself, whose state is empty before the first step
                value = engine.optimizer.state.get(param, {}).get(kind, torch.zeros_like(param))
            state[f"optim.state.{name}.{kind}"] = value.detach().float().clone()
    return state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--stages", default="0,1,2,3")
    args = parser.parse_args()
    results = {}
    for stage in map(int, args.stages.split(",")):
        run_dir = Path(args.root) / f"zero{stage}"
        cfg, engine, loader = build(stage, run_dir)
        batches = iter(loader)
        for step in (1, 2):
            engine.train_step(split_microbatches(next(batches), 1))
            extra = {"samples_seen": step * 16, "loader": loader.state_dict(), "config": config_to_dict(cfg)}
            path = engine.save_checkpoint(run_dir, step, extra, keep=1).path
        saved = whole_state(engine)
        following = [split_microbatches(next(batches), 1) for _ in range(2)]
        original = [engine.train_step(batch).loss for batch in following]
        _, fresh, _ = build(stage, run_dir)
        fresh_params = fresh.full_parameters()  # a fresh engine has no AdamW state yet
        extra = fresh.load_checkpoint(path)
        loaded_state = whole_state(fresh)
        resumed = [fresh.train_step(batch).loss for batch in following]
        results[stage] = {
            "checkpoint": str(path),
            "extra_step": extra["step"],
            "original": original,
            "resumed": resumed,
            "fresh_max_abs": max((v - saved[f"model.{k}"]).abs().max().item() for k, v in fresh_params.items()),
            "loaded_max_abs": max((loaded_state[k] - v).abs().max().item() for k, v in saved.items()),
        }
        if engine.ctx.is_main:
            torch.save(saved, run_dir / "saved_state.pt")
    # The checkpoint of the first stage loaded at another stage: refused in one line before DeepSpeed reads it.
    first, other = results[min(results)], (min(results) + 1) % 4
    _, engine, _ = build(other, Path(args.root) / "refused")
    try:
        engine.load_checkpoint(Path(first["checkpoint"]))
        results["other_layout_error"] = None
    except ValueError as err:
        results["other_layout_error"] = str(err)
    if engine.ctx.is_main:
        Path(args.out).write_text(json.dumps(results, indent=1))
    exit_distributed(0)


if __name__ == "__main__":
    main()
