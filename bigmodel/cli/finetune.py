"""`bigmodel finetune`: train a classifier of the embedded shapes on a pretrained image tower (bigmodel.finetune).

One process as is; DDP with accelerate: `accelerate launch --multi_gpu --num_processes 2 -m bigmodel.cli.main
finetune ...` (on CPU too, over gloo).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields

FROM_HELP = (
    "the pretrained model: a run directory or checkpoint folder (also a `ckpt reshard` output), a consolidated "
    ".safetensors file (config.json beside it) or an export-hf directory"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `finetune` command to `subparsers`."""
    from bigmodel.finetune import FinetuneConfig

    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a pretrained image tower on a downstream task (one process or accelerate DDP)",
        description="Load a checkpoint's image tower into this process and train a classifier of the embedded "
        "shapes' kind, colour or size; prints held-out accuracy before and after, against chance.",
    )
    docs = {f.name: f for f in fields(FinetuneConfig)}
    parser.add_argument("--from", dest="source", required=True, metavar="PATH", help=FROM_HELP)
    parser.add_argument("--task", choices=("shape", "colour", "size"), default=docs["task"].default)
    parser.add_argument("--head", choices=("linear", "mlp"), default=docs["head"].default)
    parser.add_argument("--pool", choices=("cls", "mean"), default=docs["pool"].default)
    parser.add_argument("--train-encoder", action="store_true", help="also update the image tower")
    for name, kind in (("steps", int), ("batch_size", int), ("grad_accum", int), ("lr", float), ("seed", int)):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=docs[name].default)
    for name in ("train_size", "eval_size", "max_shapes"):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=docs[name].default)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=docs["precision"].default)
    parser.add_argument("--out", dest="out_dir", default="", help="write classifier.safetensors and finetune.json here")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bigmodel.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    result = finetune(cfg)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    if args.json:
        print(json.dumps(asdict(result)))
        return 0
    print(f"task: {result.task} ({len(result.classes)} classes), {result.processes} process(es)")
    print(
        f"held-out accuracy: {result.accuracy_before:.3f} -> {result.accuracy_after:.3f} "
        f"(chance {result.chance:.3f}); final training loss {result.final_loss:.4f}"
    )
    if cfg.out_dir:
        print(f"wrote {cfg.out_dir}/classifier.safetensors")
    return 0
