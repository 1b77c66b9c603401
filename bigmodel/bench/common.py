"""What every benchmark shares: the result record, interleaved timing and starting torchrun workers."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Figure:
    """One benchmark figure: `ratio` = candidate / baseline, both measured in the same run, against a target."""

    name: str
    title: str
    ratio: float
    target: float
    direction: Literal["<=", ">="]
    baseline: dict[str, Any]
    """What the ratio divides by: label, value, unit."""
    candidate: dict[str, Any]
    command: str
    """The command that reproduces the figure."""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool:
        return self.ratio <= self.target if self.direction == "<=" else self.ratio >= self.target

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"met": self.met}


def interleaved(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    before: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, run in turn (a, b, a, b, ...) so that load changes on a shared machine
    hit all of them alike. Warm-up calls are not timed. `before`, if given, runs untimed before every call (warm-up
    calls too), e.g. to drop files from the page cache."""
    prepare = before or (lambda: None)
    for fn in candidates.values():
        for _ in range(warmup):
            prepare()
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            prepare()
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-repetition ratios: each pair was measured back to back, under the same load."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def median(values: list[float]) -> float:
    return statistics.median(values)


def run_workers(
    nproc: int, module: str, args: list[str], timeout: float = 900, env: dict[str, str] | None = None
) -> None:
    """Start `python -m module args` under torchrun with `nproc` processes on this machine (gloo, one thread each),
    with `env` added to the environment; raise RuntimeError with the end of the output if the job fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module]
    result = subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{module} x{nproc} exited {result.returncode}:\n{(result.stdout + result.stderr)[-4000:]}")


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def machine() -> str:
    """A one-line description of where the figures were measured."""
    import platform

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return f"{platform.processor() or platform.machine()}, {cores} cores, load {load:.1f}, torch {torch.__version__}"
