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
    parser.set_defaults(func=run, takes_overrides=True)


def run(args: argparse.Namespace) -> int:
    from bigmodel.train.loop import TrainingDiverged, print_result, train

    try:
        result = train(config_from_args(args))
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print_result(result)
    return 0
