"""Data: the embedded shapes dataset, WebDataset shards, the caption tokenizer and deterministic loaders."""

from bigmodel.data.build import build_eval_loader, build_tokenizer, build_train_loader
from bigmodel.data.dataset import IGNORE_INDEX, ImageTextDataset, PairSource, mask_tokens
from bigmodel.data.loader import EvalLoader, GlobalBatchLoader
from bigmodel.data.shapes import ShapesSource, render_shapes
from bigmodel.data.shards import BadSample, IndexedShards, pack_pairs, write_shapes_shards
from bigmodel.data.tokenizer import CaptionTokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "BadSample",
    "CaptionTokenizer",
    "EvalLoader",
    "GlobalBatchLoader",
    "ImageTextDataset",
    "IndexedShards",
    "PairSource",
    "ShapesSource",
    "build_eval_loader",
    "build_tokenizer",
    "build_train_loader",
    "load_tokenizer",
    "mask_tokens",
    "pack_pairs",
    "render_shapes",
    "train_tokenizer",
    "write_shapes_shards",
]
