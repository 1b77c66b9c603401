"""`bigmodel eval`: held-out metrics of a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bigmodel.cli.common import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint on the held-out split",
        description="Zero-shot image<->text retrieval recall@1/@5, image-text matching accuracy and masked-LM "
        "accuracy of a checkpoint on the held-out split. Without --config, the config saved in the run "
        "directory is used.",
    )
    parser.add_argument("checkpoint", help="a run directory, its checkpoints/ folder or one step_* folder")
    add_config_arguments(parser, required=False)
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.set_defaults(func=run, takes_overrides=True)


def run(args: argparse.Namespace) -> int:
    from bigmodel.train.evaluate import evaluate_checkpoint
    from bigmodel.train.loop import format_eval

    if args.config is None:
        args.config = find_run_config(Path(args.checkpoint))
    metrics = evaluate_checkpoint(config_from_args(args), args.checkpoint)
    print(json.dumps(metrics) if args.json else format_eval(metrics))
    return 0


def find_run_config(checkpoint: Path) -> Path:
    """The config.yaml of the run a checkpoint belongs to (the run dir, or two/three levels above a step)."""
    for folder in (checkpoint, *checkpoint.resolve().parents[:3]):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise FileNotFoundError(f"no config.yaml found for {checkpoint}; pass --config FILE")
