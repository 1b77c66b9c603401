"""`bigmodel launch`: build and run the torchrun command for a training job on this node."""

from __future__ import annotations

import argparse
import os
import subprocess

from bigmodel.cli.common import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "launch",
        help="start a multi-process training job with torchrun",
        description="Runs `torchrun ... -m bigmodel.train --config FILE [overrides]` with one process per "
        "--nproc and OMP_NUM_THREADS set so the node's cores are shared. The layout comes from the config's "
        "parallel section (dp_replicate x dp_shard x tp x pp must equal the number of processes).",
    )
    add_config_arguments(parser)
    parser.add_argument("--nproc", type=int, required=True, help="processes on this node (GPUs, or CPU workers)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes in the job (default 1)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1")
    parser.add_argument("--rdzv-endpoint", default="", help="HOST:PORT of the first node, for --nnodes > 1")
    parser.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a worker failure")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.set_defaults(func=run, takes_overrides=True)


def run(args: argparse.Namespace) -> int:
    from bigmodel.config import load_config
    from bigmodel.parallel.dims import ParallelDims
    from bigmodel.parallel.launch import TorchrunSpec, printable, threads_per_process, torchrun_command

    # A bad config or a layout that does not fit the processes fails here, once, not in every worker.
    cfg = load_config(args.config, args.overrides)
    ParallelDims.from_config(cfg).validate(args.nproc * args.nnodes, cfg)
    spec = TorchrunSpec(args.nproc, args.nnodes, args.node_rank, args.rdzv_endpoint, args.max_restarts)
    cmd = torchrun_command(spec, ["--config", args.config, *args.overrides])
    env = {"OMP_NUM_THREADS": str(threads_per_process(args.nproc))}
    if args.dry_run:
        print(printable(cmd, env))
        return 0
    return subprocess.run(cmd, env={**os.environ, **env}).returncode
