"""Multi-process figures, measured by real gloo processes started under torchrun: per-rank model-state bytes
against ZeRO's theory and the planner (d), bytes of the collectives actually issued in one step against the
planner's theory (e), and native ZeRO-3 against DeepSpeed ZeRO-3 step time (f).

`python -m bigmodel.bench.distributed --task memory|comm|zero3 --config F --layouts L1,L2 --out FILE [overrides]`
is the worker; rank 0 writes FILE. The functions below start it and turn its output into Figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from bigmodel.bench.common import ROOT, Figure, interleaved, median, paired_ratio, run_workers
from bigmodel.config import Config, load_config
from bigmodel.parallel.gloo import collectives
from bigmodel.tools.plan import (
    Layout,
    dp_comm_bytes,
    loss_comm_bytes,
    model_state_bytes,
    parameter_table,
    ring,
    stages,
    tp_comm_bytes,
)

TINY = str(ROOT / "configs" / "tiny.yaml")
MODULE = "bigmodel.bench.distributed"
# Full mode: 4 + 4 blocks of width 256 and one fusion block; enough parameters that gradient traffic dominates.
FULL_MODEL = [
    "--model.vision_width=256", "--model.vision_heads=4", "--model.vision_mlp_dim=1024", "--model.vision_layers=4",
    "--model.text_width=256", "--model.text_heads=4", "--model.text_mlp_dim=1024", "--model.text_layers=4",
    "--train.global_batch_size=32",
]  # fmt: skip


def planner_layout(cfg: Config) -> Layout:
    p = cfg.parallel
    return Layout(p.dp_replicate, p.dp_shard, p.tp, p.pp, p.zero_stage, p.sp, cfg.train.grad_accum,
                  cfg.train.activation_checkpointing, p.reshard_after_forward)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Counting collectives


class CollectiveCounter(TorchDispatchMode):
    """Counts every collective issued while active, as the bytes one rank sends in the ring algorithm of each (the
    same cost model as the planner's `ring`): c10d (torch.distributed calls: the losses, gloo's fallbacks) and
    functional (DTensor, funcol) operations at dispatch (ZeroOptimizer and FSDP2 by default among them), and, with
    parallel.gloo_transport, `bigmodel.parallel.gloo.collectives`' all-gathers and reduce-scatters as they report
    themselves, whether shared memory or point-to-point messages carry them. Waits and autograd wrappers are not
    collectives and are skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._observing = contextlib.ExitStack()

    def _count(self, kind: str, nbytes: float) -> None:
        self.sent[kind] = self.sent.get(kind, 0.0) + nbytes
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def __enter__(self):
        self._observing.enter_context(collectives.observe(self._count))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._observing.close()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("c10d", "_c10d_functional") and not collectives.inside():
            counted = _ring_bytes(func.__name__.split(".")[0], args)
            if counted is not None:
                self._count(*counted)
        return func(*args, **kwargs)

    @property
    def total(self) -> float:
        return sum(self.sent.values())


def _group(group: Any) -> dist.ProcessGroup:
    if isinstance(group, str):
        return dist.distributed_c10d._resolve_process_group(group)
    return dist.ProcessGroup.unbox(group)  # c10d ops carry the group as a TorchScript object


def _group_size(group: Any) -> int:
    return _group(group).size()


def _all_to_all_sent(inputs: list[torch.Tensor], splits: list[int], group: Any) -> float:
    """Bytes of an all-to-all's input that leave this rank: all but the part it addresses to itself. `inputs` is
    one tensor split along dim 0 (by `splits`, evenly when empty) or one tensor per rank."""
    group = _group(group)
    if len(inputs) > 1:
        return float(_nbytes(inputs) - _nbytes(inputs[group.rank()]))
    rows = max(1, inputs[0].shape[0])
    own = splits[group.rank()] if splits else rows // group.size()
    return _nbytes(inputs) * (1 - own / rows)


def _nbytes(tensors: Any) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


def _ring_bytes(name: str, args: tuple) -> tuple[str, float] | None:
    """(collective, bytes this rank sends) for one dispatched op, None for ops that move nothing."""
    if name in ("allreduce_", "allreduce_coalesced_"):
        return "all_reduce", ring(_nbytes(args[0]), _group_size(args[1]), "all_reduce")
    if name in ("all_reduce", "all_reduce_", "all_reduce_coalesced", "all_reduce_coalesced_"):
        return "all_reduce", ring(_nbytes(args[0]), _group_size(args[2]), "all_reduce")
    if name in ("_allgather_base_", "allgather_into_tensor_coalesced_"):
        out, inp = args[0], args[1]
        return "all_gather", ring(_nbytes(out), max(1, _nbytes(out) // max(1, _nbytes(inp))), "all_gather")
    if name == "allgather_":
        ranks = len(args[0][0])
        return "all_gather", ring(ranks * _nbytes(args[1]), ranks, "all_gather")
    if name in ("all_gather_into_tensor", "all_gather_into_tensor_out", "all_gather_into_tensor_coalesced"):
        ranks = args[1]
        return "all_gather", ring(ranks * _nbytes(args[0]), ranks, "all_gather")
    if name in ("_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_"):
        out, inp = args[0], args[1]
        return "reduce_scatter", ring(_nbytes(inp), max(1, _nbytes(inp) // max(1, _nbytes(out))), "reduce_scatter")
    if name in ("reduce_scatter_tensor", "reduce_scatter_tensor_coalesced"):
        return "reduce_scatter", ring(_nbytes(args[0]), args[2], "reduce_scatter")
    if name in ("broadcast_", "broadcast"):
        return "broadcast", float(_nbytes(args[0]))
    if name in ("send", "recv_", "send_", "recv"):
        return "p2p", float(_nbytes(args[0])) if name.startswith("send") else 0.0
    if name == "alltoall_base_":
        return "all_to_all", _all_to_all_sent([args[1]], args[4], args[2])
    if name == "alltoall_":
        return "all_to_all", _all_to_all_sent(args[1], [], args[2])
    if name == "all_to_all_single":
        return "all_to_all", _all_to_all_sent([args[0]], args[2], args[3])
    return None


def comm_theory(cfg: Config) -> dict[str, float]:
    """The planner's bytes per step per rank for cfg's layout: gradient/parameter traffic, the contrastive gather,
    tensor-parallel activations."""
    from bigmodel.losses import active_objectives

    objectives = active_objectives(cfg.train.loss_weights)
    layout = planner_layout(cfg)
    stage = stages(cfg, objectives, 1)[0]
    params = stage.parameters(parameter_table(cfg.model, objectives), layout.tp)
    microbatch = cfg.train.global_batch_size // (layout.dp * layout.microbatches)
    return {
        "dp": dp_comm_bytes(params, layout, layout.microbatches) if layout.dp > 1 else 0.0,
        "loss": loss_comm_bytes(cfg, objectives, layout.dp, microbatch, layout.microbatches),
        "tp": tp_comm_bytes(cfg, objectives, stage, layout, microbatch),
    }


# ---------------------------------------------------------------------------------------------------------------
# The worker


def _run_memory(cfg: Config, ctx, engine, loader) -> dict[str, Any]:
    from bigmodel.losses import active_objectives
    from bigmodel.train.loop import split_microbatches

    engine.train_step(split_microbatches(next(loader), cfg.train.grad_accum))
    objectives = active_objectives(cfg.train.loss_weights)
    stage = stages(cfg, objectives, 1)[0]
    predicted = model_state_bytes(parameter_table(cfg.model, objectives), stage, planner_layout(cfg))
    return {"measured": engine.memory, "predicted": predicted}


def _run_comm(cfg: Config, ctx, engine, loader) -> dict[str, Any]:
    from bigmodel.train.loop import split_microbatches

    engine.train_step(split_microbatches(next(loader), cfg.train.grad_accum))  # optimizer state exists from now on
    counter = CollectiveCounter()
    batch = split_microbatches(next(loader), cfg.train.grad_accum)
    with counter:
        engine.train_step(batch)
    return {"counted": counter.sent, "calls": counter.calls, "theory": comm_theory(cfg)}


def _deepspeed_engine(cfg: Config, ctx, keep_gathered: bool = True, persistence_threshold: int = 0):
    """DeepSpeed ZeRO-3 over the same model and initial weights, configured like the native run: fp32, AdamW with
    the trainer's hyper-parameters, gradient clipping set explicitly (DeepSpeed defaults to 1.0), every parameter
    partitioned, and reduce and prefetch buckets the size of the model: what DeepSpeed's defaults (5e8 and 5e7
    elements) amount to for a model this small, without allocating the default reduce bucket's ~1.9 GB.

    `keep_gathered` keeps DeepSpeed's defaults (stage3_max_reuse_distance and stage3_max_live_parameters 1e9): a
    module's gathered parameters stay until their reuse in backward (one all-gather per parameter and step), as
    native `parallel.reshard_after_forward=false` does. False frees them after use (reuse distance 0, live
    parameters capped at the prefetch bucket), as native's default does (two all-gathers); reuse distance 0 alone
    still keeps every parameter, because the prefetcher has already fetched them for backward.

    `persistence_threshold` (stage3_param_persistence_threshold): parameters of fewer elements stay whole on every
    rank. 0 partitions every parameter, as native ZeRO-3 does; DeepSpeed's default, 1e5, is the figure's
    `default_persistence_ratio` detail (docs/benchmarks.md, row f)."""
    import deepspeed

    from bigmodel.losses import active_objectives
    from bigmodel.models import build_model
    from bigmodel.optim import build_optimizer

    model = build_model(cfg.model, active_objectives(cfg.train.loss_weights), cfg.train.seed)
    micro = cfg.train.global_batch_size // ctx.dims.dp
    whole = sum(p.numel() for p in model.parameters())  # what DeepSpeed's default buckets (5e8, 5e7) hold of it
    zero = {
        "stage": 3,
        "reduce_bucket_size": whole,
        "stage3_param_persistence_threshold": persistence_threshold,
        "stage3_prefetch_bucket_size": whole,
    }
    if not keep_gathered:
        zero |= {
            "stage3_max_reuse_distance": 0,
            "stage3_max_live_parameters": 1_000_000,
            "stage3_prefetch_bucket_size": 1_000_000,
        }
    config = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.train), config=config)
    return engine


def _run_zero3(cfg: Config, ctx, engine, loader, repeats: int) -> dict[str, Any]:
    """Step times of two matched pairs and two more runs, all six interleaved: gathered parameters kept
    from a block's forward to its backward ("native_keep", "deepspeed": DeepSpeed's default) and freed after
    forward ("native", "deepspeed_free": native's default); "deepspeed_default_persistence" is "deepspeed" with
    small parameters kept whole (DeepSpeed's default persistence threshold); "native_keep_gloo" is "native_keep"
    with the opt-in gloo transport (parallel.gloo_transport). `engine` is the native engine of `cfg`, whose
    reshard_after_forward is the default."""
    from bigmodel.engines import build_engine
    from bigmodel.losses import total_loss
    from bigmodel.train.loop import split_microbatches

    keep = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, reshard_after_forward=False))
    native_keep = build_engine(keep, ctx)
    gloo = dataclasses.replace(keep, parallel=dataclasses.replace(keep.parallel, gloo_transport=True))
    native_keep_gloo = build_engine(gloo, ctx)
    with contextlib.redirect_stdout(sys.stderr):
        ds_keep = _deepspeed_engine(cfg, ctx, keep_gathered=True)
        ds_free = _deepspeed_engine(cfg, ctx, keep_gathered=False)
        ds_persist = _deepspeed_engine(cfg, ctx, keep_gathered=True, persistence_threshold=100_000)
    batch = next(loader)

    def native_step(native) -> Callable[[], None]:
        return lambda: native.train_step(split_microbatches(batch, 1))

    def deepspeed_step(ds) -> Callable[[], None]:
        def step() -> None:
            loss, _ = total_loss(ds(batch), cfg.train.loss_weights, ctx.dp_group)
            ds.backward(loss)
            ds.step()

        return step

    cpu: dict[str, list[float]] = {}

    def synced(name: str, fn):
        # CPU seconds of this process (all threads) beside the wall time: the work of a step, which the load of a
        # shared machine changes far less than the wall time. Warm-up calls are recorded too and dropped below.
        def run() -> None:
            dist.barrier()
            start = time.process_time()
            fn()
            cpu.setdefault(name, []).append(time.process_time() - start)
            dist.barrier()

        return run

    candidates = {
        "native_keep": native_step(native_keep),
        "deepspeed": deepspeed_step(ds_keep),
        "native": native_step(engine),
        "deepspeed_free": deepspeed_step(ds_free),
        "deepspeed_default_persistence": deepspeed_step(ds_persist),
        "native_keep_gloo": native_step(native_keep_gloo),
    }
    times = interleaved({name: synced(name, fn) for name, fn in candidates.items()}, repeats, warmup=2)
    return {"seconds": times, "cpu_seconds": {name: values[-repeats:] for name, values in cpu.items()}}


def worker_main(argv: list[str] | None = None) -> int:
    from bigmodel.data import build_train_loader
    from bigmodel.engines import build_engine
    from bigmodel.parallel.context import setup_parallel
    from bigmodel.parallel.env import exit_distributed
    from bigmodel.tools.verify import layout_overrides

    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--config", required=True)
    parser.add_argument("--jobs", required=True, help="comma-separated TASK:LAYOUT, e.g. memory:zero1x2,comm:tp2")
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for job in args.jobs.split(","):
        task, layout = job.split(":")
        cfg = load_config(args.config, [*overrides, *layout_overrides(layout)])
        ctx = setup_parallel(cfg)
        torch.manual_seed(cfg.train.seed)
        loader = iter(build_train_loader(cfg, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp))
        engine = build_engine(cfg, ctx)
        if task == "memory":
            mine = _run_memory(cfg, ctx, engine, loader)
        elif task == "comm":
            mine = _run_comm(cfg, ctx, engine, loader)
        elif task == "zero3":
            mine = _run_zero3(cfg, ctx, engine, loader, args.repeats)
        else:
            raise ValueError(f"unknown task {task!r} in --jobs; use memory, comm or zero3")
        per_rank = [None] * ctx.env.world_size
        dist.all_gather_object(per_rank, mine)
        results[job] = per_rank
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=1), encoding="utf-8")
    exit_distributed(0)
    return 0


def run_jobs(nproc: int, jobs: list[str], quick: bool, repeats: int = 5) -> dict[str, Any]:
    """Run TASK:LAYOUT jobs in one torchrun launch of `nproc` processes; every rank's result per job."""
    with tempfile.TemporaryDirectory(prefix="bigmodel-bench-") as tmp:
        out = Path(tmp) / "out.json"
        model = [] if quick else FULL_MODEL
        args = ["--config", TINY, "--jobs", ",".join(jobs), "--out", str(out), "--repeats", str(repeats)]
        run_workers(nproc, MODULE, [*args, *model, f"--train.out_dir={tmp}", "--log.wandb=disabled"])
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------------------------
# Figures


def memory_vs_theory(quick: bool = False) -> list[Figure]:
    """(d) Per-rank model-state bytes of ZeRO stages 0-3 over dp ranks, measured after the first step, over ZeRO's
    theory as the planner computes it. The ratio is the largest over ranks and parts (params, grads, optimizer)."""
    nproc = 2 if quick else 4
    layouts = [f"zero{s}x{nproc}" for s in range(4)]
    return memory_figures(run_jobs(nproc, [f"memory:{x}" for x in layouts], quick), nproc)


def memory_figures(results: dict[str, Any], nproc: int) -> list[Figure]:
    figures = []
    for stage in range(4):
        ranks = results[f"memory:zero{stage}x{nproc}"]
        ratios = [r["measured"][k] / r["predicted"][k] for r in ranks for k in ("params", "grads", "optimizer")]
        measured = sum(ranks[0]["measured"].values())
        predicted = sum(ranks[0]["predicted"].values())
        figures.append(
            Figure(
                name=f"model_state_zero{stage}",
                title=f"per-rank model-state bytes, ZeRO-{stage} x {nproc} ranks: measured / theory (worst part)",
                ratio=max(ratios),
                target=1.05,
                direction="<=",
                baseline={"label": "ZeRO theory (planner)", "value": predicted, "unit": "bytes, rank 0"},
                candidate={"label": "measured (memory.json)", "value": measured, "unit": "bytes, rank 0"},
                command="bigmodel bench --only memory",
                details={"per_rank": ranks, "min_ratio": min(ratios)},
            )
        )
    return figures


def comm_vs_theory(quick: bool = False) -> list[Figure]:
    """(e) Bytes one rank sends in the collectives it actually issues during one training step (counted at
    dispatch, ring cost per collective), over the planner's theory, for data parallel (ZeRO-0), ZeRO-3 (freeing
    gathered parameters after forward, and keeping them: parallel.reshard_after_forward=false) and tensor parallel,
    on 2 ranks."""
    return comm_figures(run_jobs(2, [f"comm:{x}" for x in COMM_LAYOUTS.values()], quick))


COMM_LAYOUTS = {"dp": "zero0x2", "zero3": "zero3x2", "zero3_keep": "zero3x2-keep", "tp": "tp2"}


def comm_figures(results: dict[str, Any]) -> list[Figure]:
    figures = []
    for kind, layout in COMM_LAYOUTS.items():
        ranks = results[f"comm:{layout}"]
        rank0 = ranks[0]
        counted, theory = sum(rank0["counted"].values()), sum(rank0["theory"].values())
        figures.append(
            Figure(
                name=f"comm_{kind}",
                title=f"bytes sent per step per rank, {layout}: counted collectives / theory",
                ratio=max(sum(r["counted"].values()) / theory for r in ranks),
                target=1.05,
                direction="<=",
                baseline={"label": "planner theory", "value": theory, "unit": "bytes"},
                candidate={"label": "counted at dispatch", "value": counted, "unit": "bytes"},
                command="bigmodel bench --only comm",
                details={"counted": rank0["counted"], "calls": rank0["calls"], "theory": rank0["theory"]},
            )
        )
    return figures


def zero3_vs_deepspeed(quick: bool = False) -> Figure:
    """(f) Step time of the native ZeRO-3 (FSDP2) engine over DeepSpeed ZeRO-3, same model, weights, batch and
    world size (2 processes), fp32, interleaved. Both keep a block's gathered parameters from its forward to its
    backward, as DeepSpeed does by default (native: parallel.reshard_after_forward=false), and every parameter is
    partitioned on both sides; details hold the pair that frees them after forward as well ("free_ratio") and the
    ratio to DeepSpeed with its default persistence threshold ("default_persistence_ratio"), and the opt-in gloo
    transport's ratio ("gloo_transport_ratio")."""
    return zero3_figure(run_jobs(2, ["zero3:zero3x2"], quick, repeats=2 if quick else 7))


def zero3_figure(results: dict[str, Any]) -> Figure:
    times, cpu = results["zero3:zero3x2"][0]["seconds"], results["zero3:zero3x2"][0]["cpu_seconds"]
    return Figure(
        name="zero3_vs_deepspeed",
        title="step time, ZeRO-3 x 2 ranks: native (FSDP2) / DeepSpeed ZeRO-3",
        ratio=paired_ratio(times["native_keep"], times["deepspeed"]),
        target=0.8,
        direction="<=",
        baseline={
            "label": "DeepSpeed ZeRO-3 (every parameter partitioned)",
            "value": median(times["deepspeed"]),
            "unit": "s/step",
        },
        candidate={
            "label": "native ZeRO-3, reshard_after_forward=false",
            "value": median(times["native_keep"]),
            "unit": "s/step",
        },
        command="bigmodel bench --only zero3",
        details={
            "seconds": times,
            "free_ratio": paired_ratio(times["native"], times["deepspeed_free"]),
            "default_persistence_ratio": paired_ratio(times["native_keep"], times["deepspeed_default_persistence"]),
            "gloo_transport_ratio": paired_ratio(times["native_keep_gloo"], times["deepspeed"]),
            "cpu_seconds": cpu,
            "cpu_ratio": paired_ratio(cpu["native_keep"], cpu["deepspeed"]),
            "free_cpu_ratio": paired_ratio(cpu["native"], cpu["deepspeed_free"]),
        },
    )


if __name__ == "__main__":
    sys.exit(worker_main())
