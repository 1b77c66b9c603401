"""`bigmodel eval`: held-out metrics of a checkpoint, or a zero-shot task on an evaluation set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bigmodel.cli.common import add_config_arguments, config_from_args
from bigmodel.config import ConfigError

ZEROSHOT_TASKS = ("zeroshot_classification", "zeroshot_retrieval")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint on the held-out split or a zero-shot task",
        description="Without --task: zero-shot image<->text retrieval recall@1/@5, image-text matching accuracy and "
        "masked-LM accuracy of a checkpoint on the held-out split (without --config, the config saved in the run "
        "directory is used). With --task zeroshot_classification or zeroshot_retrieval: CLIP_benchmark's metrics "
        "on --dataset (docs/evaluation.md); under torchrun (python -m bigmodel.eval) the work is split over the "
        "processes and the metrics equal one process's.",
    )
    parser.add_argument("checkpoint", help="a run directory, its checkpoints/ folder or one step_* folder")
    add_config_arguments(parser, required=False)
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.add_argument("--task", choices=ZEROSHOT_TASKS, help="a zero-shot task instead of the held-out metrics")
    parser.add_argument(
        "--dataset",
        metavar="DIR",
        help="for --task: an ImageFolder tree, WebDataset shards (CLIP_benchmark layout), a folder with "
        "captions.json (retrieval), or the built-in shapes / shapes-colours (classification)",
    )
    parser.add_argument("--templates", metavar="FILE", help="prompt templates, one per line, each with {c}")
    parser.add_argument("--out", metavar="FILE", help="also write the result JSON (CLIP_benchmark's layout) here")
    parser.add_argument("--batch-size", type=int, default=64, help="images or captions per forward (default 64)")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="for --task: processes on this node to split the work over, started with torchrun as `bigmodel launch` "
        "starts training (default 1: this process)",
    )
    parser.set_defaults(func=run, takes_overrides=True)


def run(args: argparse.Namespace) -> int:
    if args.task is not None:
        return run_zeroshot_task(args)
    from bigmodel.train.evaluate import evaluate_checkpoint
    from bigmodel.train.loop import format_eval

    if args.config is None:
        args.config = find_run_config(Path(args.checkpoint))
    metrics = evaluate_checkpoint(config_from_args(args), args.checkpoint)
    print(json.dumps(metrics) if args.json else format_eval(metrics))
    return 0


def run_zeroshot_task(args: argparse.Namespace) -> int:
    """A zero-shot task: the model, tokenizer and transform all come from the checkpoint's saved config."""
    from bigmodel.eval import run_zeroshot
    from bigmodel.parallel.env import read_dist_env

    if args.dataset is None:
        raise ConfigError(f"--task {args.task} needs --dataset DIR")
    if args.config is not None or args.overrides:
        raise ConfigError(
            "--config and overrides apply to the held-out metrics only; a zero-shot task uses the "
            "checkpoint's saved config"
        )
    if args.nproc > 1:
        return launch_zeroshot_task(args)
    result = run_zeroshot(args.checkpoint, args.task, args.dataset, args.templates, args.batch_size)
    if read_dist_env().rank != 0:  # every rank holds the same result
        return 0
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    metrics = result["metrics"]
    print(json.dumps(metrics) if args.json else "  ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    return 0


def launch_zeroshot_task(args: argparse.Namespace) -> int:
    """Run the task as `torchrun --nproc-per-node=N -m bigmodel.eval ...` on this node and return its exit status."""
    import os
    import subprocess

    from bigmodel.launch.commands import TorchrunSpec, threads_per_process, torchrun_command
    from bigmodel.parallel.env import read_dist_env

    if read_dist_env().world_size > 1:
        raise ConfigError("--nproc starts its own processes; under torchrun or srun, leave it out")
    worker = [args.checkpoint, "--task", args.task, "--dataset", args.dataset, "--batch-size", str(args.batch_size)]
    for flag, value in (("--templates", args.templates), ("--out", args.out)):
        if value is not None:
            worker += [flag, value]
    if args.json:
        worker.append("--json")
    cmd = torchrun_command(TorchrunSpec(args.nproc), worker, module="bigmodel.eval")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process(args.nproc))}
    return subprocess.run(cmd, env=env).returncode


def find_run_config(checkpoint: Path) -> Path:
    """The config.yaml of the run a checkpoint belongs to (the run dir, or two/three levels above a step)."""
    for folder in (checkpoint, *checkpoint.resolve().parents[:3]):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise FileNotFoundError(f"no config.yaml found for {checkpoint}; pass --config FILE")
