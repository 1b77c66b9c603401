"""`bigmodel launch`: build and run the torchrun (or deepspeed launcher) command for a training job on this node."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from bigmodel.cli.common import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "launch",
        help="start a multi-process training job with torchrun or the deepspeed launcher",
        description="Runs `torchrun ... -m bigmodel.train --config FILE [overrides]` (or `deepspeed ... --module "
        "bigmodel.train ...`) with --nproc processes on this node and OMP_NUM_THREADS set so the node's cores are "
        "shared. For several nodes run the same command on each with its --node-rank (or give deepspeed a "
        "--hostfile). The layout comes from the config's parallel section (dp_replicate x dp_shard x tp x pp must "
        "equal the number of processes in the job).",
    )
    add_config_arguments(parser)
    parser.add_argument("--nproc", type=int, required=True, help="processes on this node (GPUs, or CPU workers)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes in the job (default 1)")
    parser.add_argument("--node-rank", type=int, help="this node's index, 0..nnodes-1 (default 0)")
    parser.add_argument("--rdzv-endpoint", default="", help="HOST:PORT of the first node, for --nnodes > 1")
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="torchrun restarts all workers this many times after one fails; each restart resumes from the newest "
        "checkpoint (implies --resume auto; set checkpoint.every)",
    )
    parser.add_argument("--resume", metavar="auto|PATH", help="as for `bigmodel train`")
    parser.add_argument(
        "--engine",
        choices=("native", "deepspeed"),
        help="the config's training engine (same as --engine=...); deepspeed also picks the deepspeed launcher",
    )
    parser.add_argument(
        "--launcher",
        choices=("torchrun", "deepspeed"),
        help="process launcher (default: deepspeed for engine deepspeed, else torchrun); either works with either "
        "engine",
    )
    parser.add_argument("--hostfile", default="", help="deepspeed launcher: 'HOST slots=N' per node")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.set_defaults(func=run, takes_overrides=True)


def training_arguments(args: argparse.Namespace) -> list[str]:
    """The arguments every worker gets: the config, overrides, and --resume auto when restarts must resume."""
    overrides = list(args.overrides)
    if args.engine:
        overrides.append(f"--engine={args.engine}")
    resume = args.resume
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("--checkpoint.resume=")]
    if args.max_restarts:
        if (resume or (given[-1] if given else "auto")) != "auto":
            raise ValueError("--max-restarts resumes from the newest checkpoint of the run; drop the resume PATH")
        resume = "auto"
    if resume:
        overrides.append(f"--checkpoint.resume={resume}")
    return ["--config", args.config, *overrides]


def run(args: argparse.Namespace) -> int:
    from bigmodel.config import load_config
    from bigmodel.config.validate import resolve_dp_shard
    from bigmodel.launch.commands import (
        DeepSpeedSpec,
        TorchrunSpec,
        check_ssh,
        deepspeed_command,
        printable,
        read_hostfile,
        restart_environment,
        threads_per_process,
        torchrun_command,
    )
    from bigmodel.parallel.dims import ParallelDims

    # A bad config or a layout that does not fit the processes fails here, once, not in every worker.
    worker_args = training_arguments(args)
    cfg = load_config(args.config, worker_args[2:])
    resolve_dp_shard(cfg, args.nproc * args.nnodes)  # the workers resolve it again, alike
    ParallelDims.from_config(cfg).validate(args.nproc * args.nnodes, cfg)
    if args.max_restarts and not cfg.checkpoint.every:
        print("note: checkpoint.every is 0, so a restarted job starts again from step 0", file=sys.stderr)
    launcher = args.launcher or ("deepspeed" if cfg.engine == "deepspeed" else "torchrun")
    if launcher == "torchrun":
        if args.hostfile:
            raise ValueError("--hostfile is for --launcher deepspeed; torchrun takes --nnodes and --rdzv-endpoint")
        node_rank = args.node_rank or 0
        spec = TorchrunSpec(args.nproc, args.nnodes, node_rank, args.rdzv_endpoint, args.max_restarts)
        cmd = torchrun_command(spec, worker_args)
    else:
        if args.max_restarts:
            raise ValueError("--max-restarts needs --launcher torchrun (the deepspeed launcher does not restart)")
        host, _, port = args.rdzv_endpoint.rpartition(":")
        if args.rdzv_endpoint and not port.isdigit():
            raise ValueError(f"--rdzv-endpoint {args.rdzv_endpoint!r} must be HOST:PORT, e.g. 10.0.0.1:29500")
        ds = DeepSpeedSpec(args.nproc, args.hostfile, args.nnodes, args.node_rank, host, int(port or 29500))
        cmd = deepspeed_command(ds, worker_args)
    env = {"OMP_NUM_THREADS": str(threads_per_process(args.nproc)), **restart_environment(args.max_restarts)}
    if args.dry_run:
        print(printable(cmd, env))
        return 0
    over_ssh = launcher == "deepspeed" and args.hostfile and args.nnodes > 1 and args.node_rank is None
    if over_ssh and not shutil.which("pdsh"):
        raise ValueError(
            "the deepspeed launcher starts the other hosts with pdsh, which is not installed here: install it "
            "(apt-get install pdsh), or run the command on every node with --node-rank R --rdzv-endpoint HOST:PORT"
        )
    if over_ssh:
        check_ssh(list(read_hostfile(args.hostfile))[: args.nnodes], args.hostfile)
    return subprocess.run(cmd, env={**os.environ, **env}).returncode
