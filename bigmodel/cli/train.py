"""`bigmodel train`: run a pretraining job."""

from __future__ import annotations

import argparse
import sys

from bigmodel.cli.common import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="pretrain a model (also: python -m bigmodel.train)",
        description="Pretrain the multimodal encoder described by a config. Writes config.yaml, metrics.jsonl, "
        "eval.jsonl and checkpoints/ into train.out_dir and prints held-out metrics before and after.",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue from the newest complete checkpoint in train.out_dir (auto) or from PATH "
        "(same as --checkpoint.resume=...)",
    )
    # The deepspeed launcher appends --local_rank=N unless given --no_local_rank; LOCAL_RANK in the environment
    # says the same, so the flag is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.set_defaults(func=run, takes_overrides=True)


def run(args: argparse.Namespace) -> int:
    from bigmodel.parallel.context import setup_parallel
    from bigmodel.parallel.env import exit_distributed
    from bigmodel.train.loop import TrainingDiverged, print_result, train

    if args.resume:
        args.overrides.append(f"--checkpoint.resume={args.resume}")
    cfg = config_from_args(args)
    ctx = setup_parallel(cfg)
    try:
        result = train(cfg, ctx)
    except TrainingDiverged as err:
        if ctx.is_main:
            print(f"error: {err}", file=sys.stderr)
        return 1
    if ctx.is_main:
        print_result(result)
    if ctx.env.distributed:
        exit_distributed(0)  # leaves the process group cleanly and ends the process (see its docstring)
    return 0
