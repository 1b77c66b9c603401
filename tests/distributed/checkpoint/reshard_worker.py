"""The reshard matrix, started by tests/distributed/checkpoint/test_reshard_matrix.py (4 processes, then 2; the
1-process cells run in the test itself with these functions).

Layouts are (tp, pp, dp). Every layout trains the tiny model on the same global batch of 16 as 2 microbatches
(train.grad_accum=2, or parallel.microbatches=2 with a pipeline), so all follow the 1-process trajectory.

--phase save (4 processes): each 4-process source layout trains 2 steps, saves to <root>/<name>, writes its whole
state to <root>/<name>.state.pt and trains 2 more steps (the uninterrupted continuation). Then rank 0 alone reshards
every source offline for its target (<root>/<source>-for-<target>) with reshard_checkpoint.
--phase save and --phase load: every target layout of this world size loads its source checkpoint as saved and as
resharded, and after each load records how far the whole state is from the saved one, which stored chunks each rank
read from which file, and then (resharded copy) the losses of 2 more steps.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

from bigmodel.checkpoint.reshard import reshard_checkpoint, target_layout
from bigmodel.checkpoint.safe import SafeReader, read_dcp_metadata
from bigmodel.checkpoint.sharded import load_sharded, save_sharded
from bigmodel.config import config_to_dict, load_config
from bigmodel.data import build_train_loader
from bigmodel.engines import build_engine
from bigmodel.parallel.context import setup_parallel
from bigmodel.parallel.env import exit_distributed
from bigmodel.train.loop import split_microbatches

try:
    from tests.distributed.checkpoint.ckpt_worker import deviation, whole_state
except ModuleNotFoundError:  # started as a script by torchrun, with this folder on sys.path
    from ckpt_worker import deviation, whole_state

ROOT = Path(__file__).resolve().parents[3]
LAYOUTS = {
    "tp2_dp2": {"tp": 2, "pp": 1, "dp": 2, "zero_stage": 1},
    "pp2_dp2": {"tp": 1, "pp": 2, "dp": 2, "zero_stage": 0},
    "tp2_pp2": {"tp": 2, "pp": 2, "dp": 1, "zero_stage": 0},
    "dp4": {"tp": 1, "pp": 1, "dp": 4, "zero_stage": 3},
    "single": {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 0},
    "tp2": {"tp": 2, "pp": 1, "dp": 1, "zero_stage": 0},
    "dp4_zero2": {"tp": 1, "pp": 1, "dp": 4, "zero_stage": 2},
    "tp2_dp2_zero3": {"tp": 2, "pp": 1, "dp": 2, "zero_stage": 3},
}
PAIRS = [  # (source, target)
    ("tp2_dp2", "single"),
    ("pp2_dp2", "tp2"),
    ("tp2_pp2", "dp4_zero2"),
    ("dp4", "tp2_pp2"),
    ("single", "tp2_dp2_zero3"),
]
STEPS_BEFORE, STEPS_AFTER = 2, 2


def world(name: str) -> int:
    layout = LAYOUTS[name]
    return layout["tp"] * layout["pp"] * layout["dp"]


def overrides(name: str) -> list[str]:
    """Config overrides of layout `name`: 16 samples per step as 2 microbatches."""
    layout = LAYOUTS[name]
    split = ["--parallel.microbatches=2", "--train.grad_accum=1"] if layout["pp"] > 1 else ["--train.grad_accum=2"]
    return [
        "--log.wandb=disabled",
        f"--parallel.tp={layout['tp']}",
        f"--parallel.pp={layout['pp']}",
        f"--parallel.dp_shard={layout['dp']}",
        f"--parallel.zero_stage={layout['zero_stage']}",
        *split,
    ]


def build(name: str):
    """(engine, loader, config) of the tiny config in layout `name`; identical initial weights in every layout."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides(name))
    ctx = setup_parallel(cfg)
    engine = build_engine(cfg, ctx)
    return engine, build_train_loader(cfg, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp), cfg


def train(engine, batches, grad_accum: int, steps: int) -> list[float]:
    return [engine.train_step(split_microbatches(next(batches), grad_accum)).loss for _ in range(steps)]


def save_source(name: str, root: Path) -> dict:
    """Train STEPS_BEFORE steps in layout `name`, save, then continue STEPS_AFTER steps; the losses of both."""
    engine, loader, cfg = build(name)
    batches, accum = iter(loader), cfg.train.grad_accum
    before = train(engine, batches, accum, STEPS_BEFORE)
    extra = {"step": STEPS_BEFORE, "loader": loader.state_dict(), "config": config_to_dict(cfg)}
    save_sharded(root / name, engine, extra)
    saved = merged_state(engine)
    if engine.ctx.is_main:
        torch.save(saved, root / f"{name}.state.pt")
    return {"losses": before + train(engine, batches, accum, STEPS_AFTER)}


def reshard_for(source: str, target: str, root: Path) -> Path:
    """The offline reshard of checkpoint `source` for layout `target` (one process, no collective)."""
    t = LAYOUTS[target]
    cfg_overrides = {"microbatches": 2} if t["pp"] > 1 else {}
    layout = target_layout(root / source, t["tp"], t["pp"], t["dp"], t["zero_stage"], **cfg_overrides)
    return reshard_checkpoint(root / source, root / f"{source}-for-{target}", layout, progress=False)


class ReadLog:
    """Records, per read item of a load, the stored chunk it came from, its file and whether it was read whole."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def __enter__(self) -> ReadLog:
        log, original = self, SafeReader.read_data

        def read_data(reader, plan, planner):
            chunks = {}
            for name, meta in read_dcp_metadata(Path(reader.path) / ".metadata").state_dict_metadata.items():
                for chunk in getattr(meta, "chunks", []):
                    chunks[(name, tuple(chunk.offsets))] = list(chunk.sizes)
            for item in plan.items:
                index = item.storage_index
                stored = chunks.get((index.fqn, tuple(index.offset or ())))
                log.items.append(
                    {
                        "key": f"{index.fqn}@{list(index.offset or [])}",
                        "file": reader.storage_data[index].relative_path,
                        "whole": stored is None or (not any(item.storage_offsets) and list(item.lengths) == stored),
                    }
                )
            return original(reader, plan, planner)

        self.patch = mock.patch.object(SafeReader, "read_data", read_data)
        self.patch.start()
        return self

    def __exit__(self, *exc) -> None:
        self.patch.stop()


def merged_state(engine) -> dict:
    """whole_state of every rank merged (pipeline ranks hold different parameters), on every rank."""
    merged = {}
    for state in gather(whole_state(engine), engine.ctx):
        merged |= state
    return merged


def gather(value, ctx) -> list:
    if not ctx.env.distributed:
        return [value]
    out = [None] * ctx.env.world_size
    dist.all_gather_object(out, value)
    return out


def held_deviation(engine, saved: dict) -> dict:
    """deviation() of the state this rank holds from the saved one (a pipeline rank holds its stages' part), and
    the names it holds under "keys"."""
    held = whole_state(engine)
    return deviation(held, {k: v for k, v in saved.items() if k in held}) | {"keys": sorted(held)}


def load_target(source: str, target: str, root: Path) -> dict:
    """Load `source` as saved and as resharded into layout `target`: state deviations, reads per rank, and the
    losses of STEPS_AFTER steps continued from the resharded copy."""
    saved = torch.load(root / f"{source}.state.pt", weights_only=True)
    result = {}
    for copy, path in (("as_saved", root / source), ("resharded", root / f"{source}-for-{target}")):
        engine, loader, cfg = build(target)
        if copy == "as_saved":  # fresh weights: far from the saved ones (once per pair is enough to show it)
            result["before"] = gather(held_deviation(engine, saved) | {"keys": None}, engine.ctx)
        with ReadLog() as log:
            extra = load_sharded(path, engine)
        after = held_deviation(engine, saved)
        held = after.pop("keys")
        result[copy] = {
            "after": gather(after, engine.ctx),
            "keys": sorted(set().union(*gather(held, engine.ctx))),
            "reads": gather(log.items, engine.ctx),
        }
        if copy == "resharded":
            loader.load_state_dict(extra["loader"])
            result["losses"] = train(engine, iter(loader), cfg.train.grad_accum, STEPS_AFTER)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--phase", choices=("save", "load"), required=True)
    args = parser.parse_args()
    root = Path(args.root)
    size = int(os.environ["WORLD_SIZE"])
    results: dict[str, dict] = {}
    if args.phase == "save":
        for source in sorted({s for s, _ in PAIRS if world(s) == 4}):
            results[source] = save_source(source, root)
        if dist.get_rank() == 0:
            for source, target in PAIRS:
                reshard_for(source, target, root)
        dist.barrier()
    for source, target in PAIRS:
        if world(target) == size:
            results[f"{source}->{target}"] = load_target(source, target, root)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))
    exit_distributed(0)


if __name__ == "__main__":
    main()
