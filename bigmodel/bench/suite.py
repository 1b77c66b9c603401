"""Run the benchmarks, write their JSON, a Markdown table and a chart of every ratio against its target."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bigmodel.bench.common import Figure, machine, write_json

BENCHES: dict[str, str] = {
    "trainer": "(a) trainer vs plain PyTorch loop",
    "clip": "(b) model vs transformers CLIPModel, and (c) CPU MFU",
    "memory": "(d) per-rank model-state bytes vs ZeRO theory, stages 0-3",
    "comm": "(e) bytes of the collectives issued per step vs theory (DP, ZeRO-3, TP)",
    "zero3": "(f) native ZeRO-3 vs DeepSpeed ZeRO-3 step time",
    "checkpoint": "(g) checkpoint save/load rates vs raw disk rates",
    "pipeline": "(i) pipeline idle fraction vs theory",
    "data": "(j) data loader vs a plain decode loop (local, S3), worker scaling, indexed start-up",
    "siglip": "(k) SigLIP loss memory per rank, ring vs gather exchange",
    "patch_dropout": "(l) training step time at model.patch_dropout=0.5 vs 0",
}


def _runner(name: str, quick: bool, precisions: tuple[str, ...]) -> Callable[[], list[Figure]]:
    # Imported lazily: each pulls in different heavy dependencies (transformers, deepspeed).
    if name == "trainer":
        from bigmodel.bench.speed import trainer_overhead

        return lambda: [trainer_overhead(quick)]
    if name == "clip":
        from bigmodel.bench.speed import model_speed

        return lambda: model_speed(quick, precisions)
    if name == "memory":
        from bigmodel.bench.distributed import memory_vs_theory

        return lambda: memory_vs_theory(quick)
    if name == "comm":
        from bigmodel.bench.distributed import comm_vs_theory

        return lambda: comm_vs_theory(quick)
    if name == "zero3":
        from bigmodel.bench.distributed import zero3_vs_deepspeed

        return lambda: [zero3_vs_deepspeed(quick)]
    if name == "checkpoint":
        from bigmodel.bench.checkpoint import checkpoint_rates

        return lambda: checkpoint_rates(quick)
    if name == "pipeline":
        from bigmodel.bench.pipeline import pipeline_bubble

        return lambda: [pipeline_bubble(quick)]
    if name == "data":
        from bigmodel.bench.data import data_throughput

        return lambda: data_throughput(quick)
    if name == "siglip":
        from bigmodel.bench.siglip import siglip_memory

        return lambda: siglip_memory(quick)
    if name == "patch_dropout":
        from bigmodel.bench.patch_dropout import patch_dropout_speed

        return lambda: patch_dropout_speed(quick)
    raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES)}")


def run_suite(
    out_dir: Path,
    only: list[str] | None = None,
    quick: bool = False,
    threads: int = 1,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the chosen benchmarks (all by default) and write `<out_dir>/<figure>.json`, `summary.json`,
    `table.md` and `ratios.png`. Returns the summary. `threads`: torch threads of this process (1 keeps timings
    stable on a machine shared with other work: idle spinning threads of a busy core distort every figure)."""
    torch.set_num_threads(threads)
    names = only or list(BENCHES)
    figures: list[Figure] = []
    errors: dict[str, str] = {}
    for name in names:
        progress(f"bench {name}: {BENCHES.get(name, '?')} ...")
        start = time.perf_counter()
        try:
            new = _runner(name, quick, precisions)()
        except (RuntimeError, ImportError, OSError) as err:  # one failed benchmark must not lose the others
            errors[name] = str(err)[-2000:]
            progress(f"bench {name}: failed: {str(err).splitlines()[0] if str(err) else err!r}")
            continue
        for figure in new:
            write_json(out_dir / f"{figure.name}.json", figure.to_dict())
            verdict = "meets" if figure.met else "MISSES"
            progress(f"  {figure.name}: {figure.ratio:.3f} ({verdict} {figure.direction} {figure.target})")
        figures += new
        progress(f"bench {name}: {time.perf_counter() - start:.0f} s")
    summary = {
        "machine": machine(),
        "quick": quick,
        "threads": threads,
        "figures": [f.to_dict() for f in figures],
        "errors": errors,
    }
    write_json(out_dir / "summary.json", summary)
    (out_dir / "table.md").write_text(markdown_table(summary["figures"]), encoding="utf-8")
    if figures:
        draw_ratios(summary["figures"], out_dir / "ratios.png")
    return summary


def _value(part: dict[str, Any]) -> str:
    value, unit = part["value"], part["unit"]
    if unit.startswith("bytes/s"):
        return f"{value / 1e6:.1f} MB/s"
    if unit.startswith("bytes"):
        return f"{value / 1e6:.3f} MB"
    if unit == "FLOP/s":
        return f"{value / 1e9:.1f} GFLOP/s"
    if unit == "s/step":
        return f"{value * 1e3:.1f} ms/step"
    return f"{value:.3g} {unit}"


def markdown_table(figures: list[dict[str, Any]]) -> str:
    """One row per figure: what, baseline, candidate, ratio, target, met, command."""
    rows = [
        "| figure | baseline | candidate | ratio | target | met | command |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in figures:
        rows.append(
            f"| {f['title']} | {f['baseline']['label']}: {_value(f['baseline'])} | "
            f"{f['candidate']['label']}: {_value(f['candidate'])} | {f['ratio']:.3f} | {f['direction']} "
            f"{f['target']} | {'yes' if f['met'] else '**no**'} | `{f['command']}` |"
        )
    return "\n".join(rows) + "\n"


def draw_ratios(figures: list[dict[str, Any]], path: Path) -> None:
    """Horizontal bars: each figure's ratio, its target as a tick, green where met and red where not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.4 * len(figures) + 1.2))
    names = [f["name"] for f in figures]
    y = range(len(figures))
    ax.barh(y, [f["ratio"] for f in figures], color=["tab:green" if f["met"] else "tab:red" for f in figures])
    ax.scatter([f["target"] for f in figures], y, marker="|", s=300, color="black", label="target", zorder=3)
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (candidate / baseline, measured side by side)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_summary(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
