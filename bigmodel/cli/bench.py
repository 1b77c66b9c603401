"""`bigmodel bench`: side-by-side benchmarks; each figure a ratio of two things measured in the same run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `bench` command to `subparsers`."""
    from bigmodel.bench.suite import BENCHES

    parser = subparsers.add_parser(
        "bench",
        help="benchmarks: trainer overhead, CLIP comparison, MFU, memory, communication, ZeRO-3, checkpoints",
        description="Runs the benchmarks and writes one JSON file per figure, summary.json, table.md and "
        "ratios.png to --out. Every figure is a ratio of two measurements interleaved in the same run. "
        "Benchmarks: " + "; ".join(f"{k}: {v}" for k, v in BENCHES.items()),
    )
    parser.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    parser.add_argument("--only", action="append", choices=list(BENCHES), help="run only this one (repeatable)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds each: checks the plumbing only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the timed process (default 1)")
    parser.add_argument("--precision", action="append", choices=["fp32", "bf16"], help="for clip (default both)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bigmodel.bench.suite import run_suite

    precisions = tuple(args.precision or ("fp32", "bf16"))
    summary = run_suite(Path(args.out), args.only, args.quick, args.threads, precisions,
                        progress=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
    print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
    return 1 if summary["errors"] else 0
