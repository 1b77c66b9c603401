"""Builders that turn a whole `Config` into the tokenizer and loaders a run uses."""

from __future__ import annotations

from bigmodel.config.schema import Config, DataConfig
from bigmodel.config.validate import microbatches_per_step
from bigmodel.data.dataset import ImageTextDataset, PairSource
from bigmodel.data.loader import EvalLoader, GlobalBatchLoader
from bigmodel.data.shapes import ShapesSource
from bigmodel.data.shards import IndexedShards
from bigmodel.data.tokenizer import CaptionTokenizer, load_tokenizer


def build_tokenizer(cfg: DataConfig) -> CaptionTokenizer:
    """The tokenizer named by data.tokenizer ("builtin" or a tokenizer.json path)."""
    return load_tokenizer(cfg.tokenizer)


def _checked_tokenizer(cfg: Config) -> CaptionTokenizer:
    tokenizer = build_tokenizer(cfg.data)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size is {cfg.model.vocab_size} but tokenizer {cfg.data.tokenizer!r} has "
            f"{tokenizer.vocab_size} ids; set model.vocab_size to at least {tokenizer.vocab_size}"
        )
    return tokenizer


def _train_source(cfg: Config) -> PairSource:
    if cfg.data.source == "shapes":
        return ShapesSource("train", cfg.data.train_size, cfg.model.image_size, cfg.data.max_shapes)
    if not cfg.data.train_shards:
        raise ValueError(
            "data.train_shards is empty; with data.source shards give a pattern such as data/train-{000000..000009}.tar"
        )
    return IndexedShards(cfg.data.train_shards)


def _eval_source(cfg: Config) -> PairSource | None:
    if cfg.data.source == "shapes":
        return ShapesSource("eval", cfg.data.eval_size, cfg.model.image_size, cfg.data.max_shapes)
    return IndexedShards(cfg.data.eval_shards) if cfg.data.eval_shards else None


def build_train_loader(cfg: Config, dp_rank: int = 0, dp_size: int = 1) -> GlobalBatchLoader:
    """This data-parallel rank's loader of training batches (global batch train.global_batch_size, seed
    train.seed, augmentation per data.augment).

    Each local batch holds this rank's share of each of the train.grad_accum microbatches in turn (see
    GlobalBatchLoader). Raises ValueError (naming the field to fix) if the tokenizer needs more ids than
    model.vocab_size, the shards are missing or the global batch does not split evenly over dp_size ranks.
    """
    dataset = ImageTextDataset(_train_source(cfg), _checked_tokenizer(cfg), cfg, augment=cfg.data.augment)
    return GlobalBatchLoader(
        dataset,
        cfg.train.global_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.train.seed,
        num_workers=cfg.data.num_workers,
        microbatches=microbatches_per_step(cfg),
    )


def build_eval_loader(cfg: Config, batch_size: int) -> EvalLoader | None:
    """The held-out split in fixed order, without augmentation; None when there is none (empty data.eval_shards).

    Every rank that calls it gets the whole split.
    """
    source = _eval_source(cfg)
    if source is None:
        return None
    return EvalLoader(ImageTextDataset(source, _checked_tokenizer(cfg), cfg, augment=False), batch_size)
