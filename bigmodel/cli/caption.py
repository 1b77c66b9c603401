"""`bigmodel caption`: greedy captions of image files from a checkpoint trained with the captioning objective."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "caption",
        help="caption images with a checkpoint trained with train.loss_weights.caption",
        description="Greedy decoding in one process from a checkpoint of any layout, with the run's tokenizer and "
        "evaluation image transform. Prints one line per image: the file, a tab, its caption.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a run directory, its checkpoints/ folder or one step_* folder"
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="tokens per caption at most (default: the context length)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bigmodel.tools.caption import caption_images

    for image, caption in zip(args.images, caption_images(args.checkpoint, args.images, args.max_tokens), strict=True):
        print(f"{image}\t{caption}")
    return 0
