"""`bigmodel plan`: rank parallel layouts of a config for a GPU cluster by memory, traffic and estimated time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bigmodel.cli.common import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `plan` command to `subparsers`."""
    parser = subparsers.add_parser(
        "plan",
        help="rank parallel layouts (dp, ZeRO, tp, pp, microbatches) for a GPU cluster",
        description="Per-GPU memory (parameters, gradients, optimizer state, activations with and without "
        "activation checkpointing, communication buffers) and bytes sent per step for every candidate layout of "
        "--gpus GPUs, ranked by an estimated step time; rejected layouts are listed with the reason.",
    )
    add_config_arguments(parser)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job, all nodes together")
    parser.add_argument("--gpu-mem", default="80GB", help="memory per GPU, e.g. 80GB or 141GB (default 80GB)")
    parser.add_argument("--nodes", type=int, default=0, help="nodes (default: GPUs / 8, at least 1)")
    parser.add_argument("--gpu-tflops", type=float, default=989.0, help="dense peak per GPU (default 989, H100 bf16)")
    parser.add_argument("--top", type=int, default=10, help="fitting layouts to show (default 10)")
    parser.add_argument("--json", metavar="FILE", help="also write the plan to FILE as JSON")
    parser.set_defaults(func=run, takes_overrides=True)


def run(args: argparse.Namespace) -> int:
    from bigmodel.tools.plan import Cluster, format_plan, parse_bytes, plan_layouts, plan_to_dict

    cfg = config_from_args(args)
    nodes = args.nodes or max(1, args.gpus // 8)
    cluster = Cluster(args.gpus, parse_bytes(args.gpu_mem), nodes=nodes, peak_flops=args.gpu_tflops * 1e12)
    result = plan_layouts(cfg, cluster)
    print(format_plan(result, args.top))
    if args.json:
        Path(args.json).write_text(json.dumps(plan_to_dict(result, args.top), indent=1), encoding="utf-8")
    return 0 if result.best is not None else 1
