"""`bigmodel ckpt`: inspect, compare, consolidate and convert saved checkpoints (see bigmodel.checkpoint.tools)."""

from __future__ import annotations

import argparse
import json

CHECKPOINT_HELP = "a run directory, its checkpoints/ folder or one step_* folder"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ckpt",
        help="inspect, compare, consolidate and convert checkpoints",
        description="Work with saved checkpoints from one process, whatever layout wrote them; tensors are read "
        "one at a time.",
    )
    commands = parser.add_subparsers(dest="ckpt_command", required=True, metavar="ACTION")

    inspect = commands.add_parser("inspect", help="step, layout, model, sizes and checksum status")
    inspect.add_argument("path", help=CHECKPOINT_HELP)
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(func=run_inspect)

    diff = commands.add_parser("diff", help="per-tensor differences of two checkpoints' models (exit 1 above --tol)")
    diff.add_argument("a", help=CHECKPOINT_HELP)
    diff.add_argument("b", help=CHECKPOINT_HELP)
    diff.add_argument("--tol", type=float, default=0.0, help="largest max-abs difference accepted (default 0)")
    diff.set_defaults(func=run_diff)

    consolidate = commands.add_parser("consolidate", help="the model's weights as one safetensors file")
    consolidate.add_argument("path", help=CHECKPOINT_HELP)
    consolidate.add_argument("out", help="the .safetensors file to write (config.json goes beside it)")
    consolidate.set_defaults(func=run_consolidate)

    export = commands.add_parser(
        "export-hf",
        help="a transformers directory: CLIPModel (fusion none), else bigmodel_encoder (AutoModel after import "
        "bigmodel.hf)",
    )
    export.add_argument("path", help=CHECKPOINT_HELP)
    export.add_argument(
        "out", help="directory to write config.json, model.safetensors, the tokenizer and preprocessor_config.json to"
    )
    export.set_defaults(func=run_export_hf)

    reshard = commands.add_parser(
        "reshard",
        help="rewrite a checkpoint cut for another layout (each rank reads only its own slices), or as one file",
        description="Rewrite a checkpoint so that every stored chunk is one rank's slice of the target layout, in "
        "that rank's own file (checkpoints load into any layout without this; resharding saves each rank reading "
        "and cutting whole tensors). Model, optimizer state, schedule and data position are kept. --to single writes "
        "the model's weights as one safetensors file instead (as consolidate does).",
    )
    reshard.add_argument("path", help=CHECKPOINT_HELP)
    reshard.add_argument("out", help="a new checkpoint folder (or, with --to single, the .safetensors file)")
    reshard.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the target (default 1)")
    reshard.add_argument("--pp", type=int, default=1, help="pipeline stages of the target (default 1)")
    reshard.add_argument("--dp", type=int, default=1, help="data-parallel degree of the target (default 1)")
    reshard.add_argument(
        "--zero-stage",
        type=int,
        choices=(0, 1, 2, 3),
        help="ZeRO stage (default: the saved one if dp > 1)",
    )
    reshard.add_argument("--to", choices=("layout", "single"), default="layout", help="single: one safetensors file")
    reshard.add_argument("--no-progress", action="store_true", help="no progress bar")
    reshard.epilog = (
        "Other target parallel settings (pipeline schedule, microbatches, ...) come from the saved config; override "
        "them as --parallel.key=value."
    )
    reshard.set_defaults(func=run_reshard, takes_overrides=True)

    deepspeed = commands.add_parser(
        "from-deepspeed",
        help="a DeepSpeed checkpoint (bigmodel engine: deepspeed) as a bigmodel checkpoint",
        description="Convert a checkpoint saved by the DeepSpeed engine into bigmodel's sharded format, which "
        "every bigmodel tool, resume and the native engine read.",
    )
    deepspeed.add_argument("path", help="the DeepSpeed checkpoint directory (the run's checkpoint folder)")
    deepspeed.add_argument("out", help="a new bigmodel run directory or checkpoint folder")
    deepspeed.add_argument("--no-progress", action="store_true", help="no progress bar")
    deepspeed.set_defaults(func=run_from_deepspeed)

    imp = commands.add_parser(
        "import-hf", help="a CLIPModel directory (and its tokenizer) as a bigmodel run with a step-0 checkpoint"
    )
    imp.add_argument("hf_dir", help="a directory CLIPModel.from_pretrained loads")
    imp.add_argument("out", help="a new run directory; the tokenizer is kept in OUT/tokenizer")
    imp.add_argument(
        "--tokenizer",
        help="a data.tokenizer value (builtin, a tokenizer.json or folder) whose vocabulary fits (default: the "
        "tokenizer saved in HF_DIR, else builtin)",
    )
    imp.set_defaults(func=run_import_hf)

    imp_oc = commands.add_parser(
        "import-openclip",
        help="an OpenCLIP model config JSON and its weights as a bigmodel run with a step-0 checkpoint",
    )
    imp_oc.add_argument(
        "model_config", help="an OpenCLIP model config (open_clip/model_configs/*.json or an open_clip_config.json)"
    )
    imp_oc.add_argument("weights", help="the weights: .safetensors, or a state dict saved with torch.save")
    imp_oc.add_argument("out", help="a new run directory; the tokenizer is kept in OUT/tokenizer")
    imp_oc.add_argument(
        "--tokenizer",
        default="builtin",
        help="a data.tokenizer value: the model's tokenizer.json or vocab.json + merges.txt folder (default builtin, "
        "which fits no OpenCLIP model)",
    )
    imp_oc.set_defaults(func=run_import_openclip)

    export_oc = commands.add_parser(
        "export-openclip",
        help="an OpenCLIP folder (fusion none, contrastive) that open_clip.create_model_and_transforms"
        "('local-dir:OUT') loads",
    )
    export_oc.add_argument("path", help=CHECKPOINT_HELP)
    export_oc.add_argument(
        "out", help="directory to write open_clip_config.json, open_clip_model.safetensors and the tokenizer to"
    )
    export_oc.set_defaults(func=run_export_openclip)


def run_inspect(args: argparse.Namespace) -> int:
    from bigmodel.checkpoint.tools import inspect_checkpoint

    info = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(info))
        return 0
    model = info["model"] or {}
    print(f"checkpoint: {info['path']}")
    print(f"step: {info['step']}  saved on {info['world_size']} process(es), layout {info['layout']}")
    print(
        f"model: fusion {model.get('fusion')}, vision {model.get('vision_layers')}x{model.get('vision_width')}, "
        f"text {model.get('text_layers')}x{model.get('text_width')}; objectives {', '.join(info['objectives'])}"
    )
    print(f"parameters: {info['parameters']:,} in {info['tensors']} tensors ({info['model_bytes'] / 2**20:.2f} MiB)")
    for name, size in info["files"].items():
        print(f"  {name}  {size:,} bytes")
    print(f"checksums: {info['checksums']}")
    return 0


def run_diff(args: argparse.Namespace) -> int:
    from bigmodel.checkpoint.tools import diff_checkpoints

    rows = diff_checkpoints(args.a, args.b, args.tol)
    for row in rows:
        if row.status == "compared":
            print(f"{'ok  ' if row.ok else 'DIFF'}  {row.name}  max_abs {row.max_abs:.3e}  max_rel {row.max_rel:.3e}")
        else:
            print(f"DIFF  {row.name}  {row.status}")
    bad = sum(not row.ok for row in rows)
    print(f"{len(rows) - bad} of {len(rows)} tensors within tolerance {args.tol:g}")
    return 1 if bad else 0


def run_consolidate(args: argparse.Namespace) -> int:
    from bigmodel.checkpoint.tools import consolidate

    print(f"wrote {consolidate(args.path, args.out)}")
    return 0


def run_export_hf(args: argparse.Namespace) -> int:
    from bigmodel.hf.convert import export_hf

    print(f"wrote {export_hf(args.path, args.out)}")
    return 0


def run_import_hf(args: argparse.Namespace) -> int:
    from bigmodel.hf.convert import import_hf

    print(f"wrote {import_hf(args.hf_dir, args.out, args.tokenizer)}")
    return 0


def run_import_openclip(args: argparse.Namespace) -> int:
    from bigmodel.hf.openclip import import_openclip

    print(f"wrote {import_openclip(args.model_config, args.weights, args.out, args.tokenizer)}")
    return 0


def run_export_openclip(args: argparse.Namespace) -> int:
    from bigmodel.hf.openclip import export_openclip

    print(f"wrote {export_openclip(args.path, args.out)}")
    return 0


def run_reshard(args: argparse.Namespace) -> int:
    from bigmodel.checkpoint.reshard import reshard_checkpoint, target_layout

    if args.to == "single":
        if args.overrides or (args.tp, args.pp, args.dp, args.zero_stage) != (1, 1, 1, None):
            raise ValueError(
                "--to single writes one file for one process; drop --tp/--pp/--dp/--zero-stage/--parallel.*"
            )
        print(f"wrote {reshard_checkpoint(args.path, args.out, 'single', progress=not args.no_progress)}")
        return 0
    parallel = {}
    for item in args.overrides:
        key, _, value = item.removeprefix("--").partition("=")
        if not key.startswith("parallel."):
            raise ValueError(f"{item}: reshard takes only --parallel.key=value overrides")
        parallel[key.removeprefix("parallel.")] = value
    layout = target_layout(args.path, args.tp, args.pp, args.dp, args.zero_stage, **parallel)
    out = reshard_checkpoint(args.path, args.out, layout, progress=not args.no_progress)
    print(f"wrote {out} for tp={layout.tp} x pp={layout.pp} x dp={layout.dp_shard} (ZeRO-{layout.zero_stage})")
    return 0


def run_from_deepspeed(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        from bigmodel.checkpoint.deepspeed import from_deepspeed
    except ImportError as err:
        raise ValueError(f"from-deepspeed is not available in this installation ({err})") from None
    print(f"wrote {from_deepspeed(Path(args.path), Path(args.out), progress=not args.no_progress)}")
    return 0
