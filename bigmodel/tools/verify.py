"""Layout equivalence: train a few steps in parallel layouts and compare with the single-process reference.

The reference is the same model, seed and global batch on one process, with the same microbatches (one batch
for a layout under cached accumulation: `reference_overrides`). A layout passes when its per-step losses
agree within `loss_rtol` (relative) and its first-step gradients within `grad_rtol` (per element, relative to the
model's largest gradient element).

Run under torchrun, `python -m bigmodel.tools.verify --config F --layouts dp2,tp2 --steps K --out DIR` trains
each listed layout (all of the same world size) and rank 0 saves one trace per layout; `bigmodel verify` starts
those jobs, grouped by world size, and compares.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bigmodel.config import Config, ConfigError, load_config
from bigmodel.config.validate import microbatches_per_step
from bigmodel.data import build_train_loader
from bigmodel.engines import build_engine
from bigmodel.parallel.dims import ParallelDims

_TOKEN = re.compile(r"(dp|tp|pp|zero|hsdp|sp|keep|mb|gpipe|1f1b|interleaved|zb|deepspeed|ds|native)(\d*)")
_SCHEDULES = {"gpipe": "gpipe", "1f1b": "1f1b", "interleaved": "interleaved_1f1b", "zb": "zero_bubble"}
DEFAULT_PIPELINE_MICROBATCHES = 4


def parse_layout(text: str) -> dict[str, object]:
    """Config overrides for a layout name such as dp2, tp2+sp, zero3x4, dp2xtp2xzero3, hsdp2x2 or ds-zero2x2.

    Parts joined by "x", "+" or "-": dpN (N data-parallel ranks), tpN, ppN, sp (sequence parallel), zeroS (ZeRO stage
    S; "zeroSxN" is shorthand for zeroS with N data-parallel ranks), hsdpRxS (R replicas of S-way ZeRO-3 shards),
    keep (ZeRO-3 keeps gathered parameters from forward to backward: parallel.reshard_after_forward=false),
    for pipelines mbK (K microbatches; default 4) and a schedule: gpipe, 1f1b, interleaved, zb (zero bubble); and
    the engine: ds or deepspeed (engine=deepspeed), native (the default).
    """
    parts = [p for p in re.split(r"[x+-]", text.strip().lower()) if p]
    overrides: dict[str, object] = {}
    i = 0
    while i < len(parts):
        match = _TOKEN.fullmatch(parts[i])
        if not match:
            raise ConfigError(
                f"layout {text!r}: cannot read {parts[i]!r}; use parts like dp2, tp2, sp, zero3x4, hsdp2x2"
            )
        kind, number = match.group(1), match.group(2)
        following = parts[i + 1] if i + 1 < len(parts) and parts[i + 1].isdigit() else None
        if kind == "sp":
            overrides["parallel.sp"] = True
        elif kind == "keep":
            overrides["parallel.reshard_after_forward"] = False
        elif kind in ("ds", "deepspeed", "native"):
            if number:
                raise ConfigError(f"layout {text!r}: {kind} names the engine and takes no number; e.g. ds-zero2x2")
            overrides["engine"] = "native" if kind == "native" else "deepspeed"
        elif kind in _SCHEDULES:
            overrides["parallel.pp_schedule"] = _SCHEDULES[kind]
        elif not number:
            raise ConfigError(f"layout {text!r}: {kind} needs a number, e.g. {kind}2")
        elif kind == "zero":
            overrides["parallel.zero_stage"] = int(number)
            if following:
                overrides["parallel.dp_shard"] = int(following)
                i += 1
        elif kind == "hsdp":
            if not following:
                raise ConfigError(f"layout {text!r}: hsdp needs replicas x shards, e.g. hsdp2x2")
            overrides.update({"parallel.dp_replicate": int(number), "parallel.dp_shard": int(following)})
            overrides["parallel.zero_stage"] = 3
            i += 1
        else:
            key = {"dp": "parallel.dp_shard", "tp": "parallel.tp", "pp": "parallel.pp", "mb": "parallel.microbatches"}
            overrides[key[kind]] = int(number)
        i += 1
    if overrides.get("parallel.pp", 1) > 1:
        overrides.setdefault("parallel.microbatches", DEFAULT_PIPELINE_MICROBATCHES)
    return overrides


def layout_overrides(text: str) -> list[str]:
    """parse_layout as `--key=value` strings."""
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in parse_layout(text).items()]


def layout_world_size(cfg: Config) -> int:
    return ParallelDims.from_config(cfg).world_size


@dataclass
class Trace:
    """Per-step mean losses and the full gradients after the first step's backward (before clipping)."""

    losses: list[float]
    grads: dict[str, torch.Tensor]


def run_trace(cfg: Config, ctx, steps: int) -> Trace:
    """Train `steps` steps of `cfg` in the layout of `ctx` (every rank calls this) and return the trace."""
    from bigmodel.train.loop import split_microbatches

    torch.manual_seed(cfg.train.seed)
    loader = iter(build_train_loader(cfg, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp))
    engine = build_engine(cfg, ctx)
    losses, grads = [], {}
    for step in range(steps):
        stats = engine.train_step(split_microbatches(next(loader), cfg.train.grad_accum), capture_grads=step == 0)
        losses.append(stats.loss)
        if step == 0:
            grads = stats.grads
    return Trace(losses, grads)


@dataclass
class Comparison:
    """How far a layout's trace is from the reference's."""

    layout: str
    max_loss_rel: float
    """Largest |loss - reference| / |reference| over the steps."""
    max_grad_rel: float
    """Largest |grad - reference| over all elements, relative to the largest reference |grad| of the model."""
    worst_tensor: str
    missing: list[str]
    """Tensors that have a gradient in only one of the two runs."""
    zeroed: list[str]
    """Tensors whose gradient is exactly zero in the layout but not in the reference (a stage whose backward never
    ran, or ran on inputs that did not require grad)."""

    def passed(self, loss_rtol: float, grad_rtol: float) -> bool:
        return (
            not self.missing and not self.zeroed and self.max_loss_rel <= loss_rtol and self.max_grad_rel <= grad_rtol
        )


def compare(layout: str, reference: Trace, trace: Trace) -> Comparison:
    """Largest relative loss difference over the steps and largest scaled gradient difference."""
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(trace.losses, reference.losses, strict=True))
    missing = sorted(set(reference.grads) ^ set(trace.grads))
    # Relative to the largest gradient element of the whole model, not of each tensor: some tensors' gradients are
    # sums that cancel (the ITM head's, at initialisation) or vanish exactly (attention key biases), and there a few
    # ulps of the summed terms are a large fraction of the result in any layout.
    scale = max((g.abs().max().item() for g in reference.grads.values()), default=1.0) or 1.0
    worst, worst_name = 0.0 if not missing else float("inf"), ""
    for name, ref in reference.grads.items():
        if name in trace.grads:
            deviation = (trace.grads[name].float() - ref.float()).abs().max().item() / scale
            if deviation >= worst:
                worst, worst_name = deviation, name
    zeroed = sorted(
        name
        for name, ref in reference.grads.items()
        if name in trace.grads and not trace.grads[name].any() and ref.any()
    )
    return Comparison(layout, rel, worst, worst_name, missing, zeroed)


# fp32 (24-bit mantissa, 6e-8 relative rounding): the layouts differ from the reference only in summation order
# (all-reduces, sharded matmuls), a few ulps: ~1e-7 relative. Over 10 Adam steps this stays around 1e-7 in the
# losses, so 1e-5 leaves margin while a real bug (a missing gradient reduction, a wrong shard, a wrong negative set)
# moves losses by >= 1e-3. Gradients are compared relative to the model's largest gradient element: a few ulps of
# it (measured: 2.4e-7) pass 1e-6, while a wrong or missing reduction of any tensor down to 1e-5 of that scale
# fails. bf16 autocast rounds activations to 8 bits of mantissa (~4e-3 relative), and layouts round differently.
TOLERANCES = {"fp32": (1e-5, 1e-6), "bf16": (1e-2, 1e-2)}


ONE_PROCESS_OVERRIDES = ["--train.siglip_exchange=gather"]
"""What the single-process reference changes: a SigLIP ring needs several ranks, and on one both exchanges are the
local loss."""


def reference_overrides(cfg: Config) -> tuple[str, ...]:
    """What the single-process reference of a layout running `cfg` changes: it accumulates the same microbatches
    (train.grad_accum's, or a pipeline's), except under cached accumulation, whose claim is one batch of the whole
    step: its reference is grad_accum=1."""
    if cfg.train.accumulation == "cached":
        return ("--train.accumulation=naive", "--train.grad_accum=1")
    return (f"--train.grad_accum={microbatches_per_step(cfg)}",)


@dataclass
class VerifyReport:
    """The reference trace, each layout's trace and comparison, and the tolerances applied."""

    reference: Trace
    traces: dict[str, Trace]
    comparisons: list[Comparison]
    loss_rtol: float
    grad_rtol: float

    @property
    def passed(self) -> bool:
        return all(c.passed(self.loss_rtol, self.grad_rtol) for c in self.comparisons)


def verify(
    config: str,
    overrides: list[str],
    layouts: list[str],
    steps: int,
    workdir: Path,
    loss_rtol: float | None = None,
    grad_rtol: float | None = None,
) -> VerifyReport:
    """Run the single-process reference here and each layout under torchrun; compare each with the reference.

    Raises ConfigError for a bad config or layout name before starting anything, RuntimeError (with the end of
    its output) if a layout's job fails.
    """
    import subprocess

    from bigmodel.launch.commands import TorchrunSpec, threads_per_process, torchrun_command
    from bigmodel.parallel.context import setup_parallel

    base = load_config(config, [*overrides, *ONE_PROCESS_OVERRIDES])
    default_loss, default_grad = TOLERANCES[base.train.precision]
    loss_rtol = default_loss if loss_rtol is None else loss_rtol
    grad_rtol = default_grad if grad_rtol is None else grad_rtol
    by_world: dict[int, list[str]] = {}
    reference_of: dict[str, tuple[str, ...]] = {}
    for layout in layouts:
        cfg = load_config(config, [*overrides, *layout_overrides(layout)])
        world = layout_world_size(cfg)
        ParallelDims.from_config(cfg).validate(world, cfg)
        by_world.setdefault(world, []).append(layout)
        reference_of[layout] = reference_overrides(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    references = {}
    for changes in sorted(set(reference_of.values()) | {reference_overrides(base)}):
        ref_cfg = load_config(config, [*overrides, *ONE_PROCESS_OVERRIDES, *changes])
        references[changes] = run_trace(ref_cfg, setup_parallel(ref_cfg), steps)
    reference = references[reference_overrides(base)]
    for world, group in sorted(by_world.items()):
        args = ["--config", config, "--layouts", ",".join(group), "--steps", str(steps), "--out", str(workdir)]
        cmd = torchrun_command(TorchrunSpec(world), [*args, *overrides], module="bigmodel.tools.verify")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process(world))}
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"layouts {','.join(group)} failed (exit {result.returncode}): {root_cause(result)}")
    traces = {}
    for layout in layouts:
        saved = torch.load(workdir / f"{layout}.pt", weights_only=True)
        traces[layout] = Trace(saved["losses"], saved["grads"])
    comparisons = [compare(layout, references[reference_of[layout]], trace) for layout, trace in traces.items()]
    return VerifyReport(reference, traces, comparisons, loss_rtol, grad_rtol)


def root_cause(result) -> str:
    """The first worker error in a failed torchrun job's output (torchrun's own summary says little)."""
    lines = (result.stderr + result.stdout).splitlines()
    errors = [line for line in lines if re.search(r"\b\w*(Error|Exception)\b: ", line)]
    return errors[0].strip() if errors else "\n".join(lines[-20:])


def format_table(comparisons: list[Comparison], loss_rtol: float, grad_rtol: float) -> str:
    """The comparison as an aligned text table, one layout a row."""
    rows = [f"{'layout':<16} {'max loss rel dev':>17} {'max grad rel dev':>17}  result  (worst gradient)"]
    for c in comparisons:
        verdict = "ok" if c.passed(loss_rtol, grad_rtol) else "FAIL"
        detail = f"missing {c.missing[:3]}" if c.missing else f"zero {c.zeroed[:3]}" if c.zeroed else c.worst_tensor
        rows.append(f"{c.layout:<16} {c.max_loss_rel:>17.3e} {c.max_grad_rel:>17.3e}  {verdict:<6}  {detail}")
    rows.append(f"tolerances: loss {loss_rtol:g} relative, gradients {grad_rtol:g} relative to the largest gradient")
    return "\n".join(rows)


def worker_main(argv: list[str] | None = None) -> int:
    """Entry of the torchrun job: train each layout, rank 0 saves `<out>/<layout>.pt`."""
    from bigmodel.parallel.context import setup_parallel
    from bigmodel.parallel.env import exit_distributed
    from bigmodel.train.runtime import configure_threads

    parser = argparse.ArgumentParser(prog="python -m bigmodel.tools.verify")
    parser.add_argument("--config", required=True)
    parser.add_argument("--layouts", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    args, overrides = parser.parse_known_args(argv)
    for layout in args.layouts.split(","):
        cfg = load_config(args.config, [*overrides, *layout_overrides(layout)])
        ctx = setup_parallel(cfg)
        configure_threads(cfg.train.threads, ctx.env.local_world_size)
        trace = run_trace(cfg, ctx, args.steps)
        if ctx.is_main:
            torch.save({"losses": trace.losses, "grads": trace.grads}, Path(args.out) / f"{layout}.pt")
    exit_distributed(0)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
