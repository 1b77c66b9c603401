"""The `bigmodel` command: one entry point with a subcommand per task."""

from __future__ import annotations

import argparse
import os
import sys

from bigmodel.cli import bench, caption, ckpt, data, eval, finetune, info, launch, plan, slurm, train, verify
from bigmodel.cli.common import split_overrides
from bigmodel.config import ConfigError
from bigmodel.parallel.env import read_dist_env

COMMANDS = (train, eval, caption, finetune, data, launch, slurm, verify, ckpt, plan, bench, info)

# Errors caused by what the user gave us (config, paths, data): reported as one line, not a traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, ValueError)


def one_line(err: BaseException) -> str:
    """The message of `err` as one line. An error raised in a DataLoader worker arrives re-raised by torch with the
    worker's whole traceback as its message ("Caught ValueError in DataLoader worker process 0. Original
    Traceback ..."); its last line is the original "ValueError: message"."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    prefix = f"{type(err).__name__}: "
    return last[len(prefix) :] if last.startswith(prefix) else last


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigmodel",
        description="Pretrain multimodal (image + text) encoders, from one CPU to many GPU nodes.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, run the chosen command and return its exit code (2 for bad input)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if extra and not getattr(args, "takes_overrides", False):
            parser.error(f"unrecognised arguments: {' '.join(extra)}")
        args.overrides = split_overrides(extra)
        return args.func(args)
    except USER_ERRORS as err:
        if os.environ.get("BIGMODEL_DEBUG"):
            raise
        if read_dist_env().rank == 0:  # every process of a job hits the same bad input; say it once
            print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
