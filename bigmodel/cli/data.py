"""`bigmodel data`: make, pack and inspect datasets, and train caption tokenizers.

Each subcommand parses its options, calls one library function of `bigmodel.data` and prints the result. The
library is imported inside the handlers so that `bigmodel --help` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from bigmodel.config.schema import DataConfig, ModelConfig

_DATA_DEFAULTS, _MODEL_DEFAULTS = DataConfig(), ModelConfig()
_SAMPLES_PER_SHARD = 10_000

Handler = Callable[[argparse.Namespace], int]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _user_errors_as_exit_code(handler: Handler) -> Handler:
    """Report bad input (missing files, malformed data) as one `error:` line on stderr and exit code 2."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ValueError, OSError) as error:
            print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
            return 2

    return run


def _config_lines(description: dict) -> str:
    lines = ["data:", "  source: shards", f"  train_shards: {description['train_shards']}"]
    lines.append(f"  eval_shards: {description['eval_shards']}" if description["eval_shards"] else "  eval_shards: ''")
    return "\n".join(lines)


@_user_errors_as_exit_code
def make_shapes(args: argparse.Namespace) -> int:
    from bigmodel.data import write_shapes_shards

    description = write_shapes_shards(
        args.out, args.train_size, args.eval_size, args.image_size, args.max_shapes, args.samples_per_shard
    )
    print(f"wrote {description['train_size']} train and {description['eval_size']} eval samples to {args.out}")
    print(f"to train on them, put in the config (with model.image_size: {args.image_size}):")
    print(_config_lines(description))
    return 0


@_user_errors_as_exit_code
def pack(args: argparse.Namespace) -> int:
    from bigmodel.data import pack_pairs

    description = pack_pairs(args.src, args.out, args.samples_per_shard, args.eval_fraction)
    for problem in description["skipped"]:
        print(f"skipped {problem}", file=sys.stderr)
    print(
        f"wrote {description['train_size']} train and {description['eval_size']} eval pairs to {args.out} "
        f"({len(description['skipped'])} skipped)"
    )
    print("to train on them, put in the config:")
    print(_config_lines(description))
    return 0


@_user_errors_as_exit_code
def train_tokenizer(args: argparse.Namespace) -> int:
    from bigmodel.data import IndexedShards, train_tokenizer

    tokenizer = train_tokenizer(IndexedShards(args.shards).captions(), args.kind, args.vocab_size)
    tokenizer.save(args.out)
    print(f"wrote {args.out} ({tokenizer.vocab_size} ids)")
    print(f"use it with data.tokenizer: {args.out} and model.vocab_size of at least {tokenizer.vocab_size}")
    return 0


@_user_errors_as_exit_code
def show(args: argparse.Namespace) -> int:
    from bigmodel.data import IndexedShards, ShapesSource
    from bigmodel.data.preview import preview

    if args.shards:
        source = IndexedShards(args.shards)
    else:
        source = ShapesSource(args.split, args.start + args.count, args.image_size, args.max_shapes)
    captions = preview(source, args.count, start=args.start, out=args.out)
    for index, caption in enumerate(captions, start=args.start):
        print(f"{index}: {caption}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


@_user_errors_as_exit_code
def audit(args: argparse.Namespace) -> int:
    from bigmodel.data.ledger import audit_runs

    result = audit_runs(args.run_a, args.run_b)
    for line in result.lines(args.run_a, args.run_b):
        print(line)
    return 0 if result.agree else 1


@_user_errors_as_exit_code
def index(args: argparse.Namespace) -> int:
    from bigmodel.data.index import write_indexes
    from bigmodel.data.locations import ReadOptions, split_sources

    for source in split_sources(args.pattern):
        result = write_indexes(source, args.out, ReadOptions(retries=args.retries), args.jobs)
        where = args.out or "beside the shards"
        print(f"indexed {result['shards']} shards ({result['samples']} samples) of {source}: indexes {where}")
        print(f"summary: {result['summary']}")
    if args.out:
        print(f"to train from these indexes, put in the config: data.index_dir: {args.out}")
    return 0


def _add_make_shapes(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "make-shapes",
        help="write the embedded shapes dataset as WebDataset shards",
        description="Render the embedded shapes dataset into train-NNNNNN.tar and eval-NNNNNN.tar (PNG + txt "
        "per sample) plus dataset.json, and print the config lines that train on them. Sample i of each split "
        "is the same as data.source: shapes generates on the fly.",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    add = parser.add_argument
    add("--train-size", type=_positive_int, default=_DATA_DEFAULTS.train_size, help="training samples (%(default)s)")
    add("--eval-size", type=_positive_int, default=_DATA_DEFAULTS.eval_size, help="held-out samples (%(default)s)")
    add("--image-size", type=_positive_int, default=_MODEL_DEFAULTS.image_size, help="pixels a side (%(default)s)")
    add(
        "--max-shapes",
        type=_positive_int,
        default=_DATA_DEFAULTS.max_shapes,
        help="most shapes per image, 1-9 (%(default)s)",
    )
    add("--samples-per-shard", type=_positive_int, default=_SAMPLES_PER_SHARD, help="samples per tar (%(default)s)")
    parser.set_defaults(func=make_shapes)


def _add_pack(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "pack",
        help="pack your own image-caption pairs into WebDataset shards",
        description="Pack image-caption pairs into train-NNNNNN.tar and eval-NNNNNN.tar plus dataset.json. SRC "
        "is a folder of images (png, jpg, jpeg, webp) each with a same-name .txt caption, or a CSV file with "
        "columns image,caption whose image paths are relative to the CSV. Pairs with a missing image or caption "
        "are listed and skipped.",
    )
    parser.add_argument("src", metavar="SRC", help="folder of images with .txt captions, or a .csv file")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument(
        "--samples-per-shard", type=_positive_int, default=_SAMPLES_PER_SHARD, help="samples per tar (%(default)s)"
    )
    parser.add_argument(
        "--eval-fraction",
        type=float,
        default=0.0,
        help="fraction of pairs held out for evaluation, drawn with a fixed seed (default: %(default)s)",
    )
    parser.set_defaults(func=pack)


def _add_train_tokenizer(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train-tokenizer",
        help="train a caption tokenizer on the captions of shards",
        description="Train a lowercasing tokenizer on every caption of the shards and write its tokenizer.json, "
        "with [PAD]=0 [UNK]=1 [MASK]=2 [BOS]=3 [EOS]=4 reserved. Point data.tokenizer at the file.",
    )
    parser.add_argument("--shards", required=True, metavar="PATTERN", help="e.g. data/train-{000000..000009}.tar")
    parser.add_argument("--out", required=True, metavar="FILE", help="the tokenizer.json to write")
    parser.add_argument(
        "--kind",
        choices=("wordlevel", "bpe"),
        default="wordlevel",
        help="wordlevel: one id per word; bpe: subword merges for open vocabularies (default: %(default)s)",
    )
    parser.add_argument(
        "--vocab-size",
        type=_positive_int,
        default=_MODEL_DEFAULTS.vocab_size,
        help="most ids, special tokens included; model.vocab_size must be at least this (default: %(default)s)",
    )
    parser.set_defaults(func=train_tokenizer)


def _add_show(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "show",
        help="print the captions of a few samples and optionally save their images as a grid",
        description="Print the captions of a few samples of the embedded shapes dataset (default) or of shards, "
        "and with --out write their images as a PNG grid. Needs no config.",
    )
    parser.add_argument("--shards", metavar="PATTERN", help="read these shards instead of the shapes dataset")
    parser.add_argument("--split", choices=("train", "eval"), default="train", help="shapes split (default: train)")
    parser.add_argument("--count", type=_positive_int, default=8, help="samples to show (default: %(default)s)")
    parser.add_argument("--start", type=int, default=0, help="index of the first sample (default: %(default)s)")
    parser.add_argument(
        "--image-size", type=_positive_int, default=_MODEL_DEFAULTS.image_size, help="shapes only (%(default)s)"
    )
    parser.add_argument(
        "--max-shapes", type=_positive_int, default=_DATA_DEFAULTS.max_shapes, help="shapes only (%(default)s)"
    )
    parser.add_argument("--out", metavar="FILE", help="write the images as a PNG grid here, e.g. grid.png")
    parser.set_defaults(func=show)


def _add_audit(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "audit",
        help="compare the sample ledgers of two runs: the first step, rank and sample where they differ",
        description="Rebuild every step's global batch (microbatch by microbatch, rank by rank) from each run's "
        "ledger/ folder and compare them step by step, in any two layouts. Prints the steps the runs agree on, or "
        "the first step and position where they differ with the rank that held it and the two samples (shard URL "
        "and member number). Steps only one run has are listed. Exit status 0 if they agree, 1 if not.",
    )
    parser.add_argument("run_a", metavar="RUN_A", help="a run directory (train.out_dir)")
    parser.add_argument("run_b", metavar="RUN_B", help="the run directory to compare it with")
    parser.set_defaults(func=audit)


def _add_index(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "index",
        help="write the per-shard indexes that indexed mode reads instead of scanning the tars",
        description="Read every shard of PATTERN (local, s3://, http(s)://; sources joined by ::) once and write "
        "NAME.tar.index.json per shard (member offsets and sizes, the shard's size and etag) and one summary "
        "index-HASH.json per source, beside the shards or into --out DIR. Re-run it after a shard changes.",
    )
    parser.add_argument("pattern", metavar="PATTERN", help="e.g. s3://bucket/train-{000000..009999}.tar")
    parser.add_argument("--out", default="", metavar="DIR", help="write the indexes here (local or remote) instead")
    parser.add_argument("--jobs", type=_positive_int, default=8, help="shards indexed at once (%(default)s)")
    parser.add_argument(
        "--retries", type=int, default=_DATA_DEFAULTS.retries, help="retries of a failed read (%(default)s)"
    )
    parser.set_defaults(func=index)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command and its subcommands to the `bigmodel` parser."""
    parser = subparsers.add_parser(
        "data",
        help="make, pack and inspect datasets; train caption tokenizers",
        description="Dataset tools. Training reads either the embedded shapes dataset (data.source: shapes, no "
        "files) or WebDataset shards (data.source: shards) written by make-shapes or pack.",
    )
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    for add in (_add_make_shapes, _add_pack, _add_index, _add_train_tokenizer, _add_show, _add_audit):
        add(commands)
