"""Builders that turn a whole `Config` into the tokenizer and loaders a run uses."""

from __future__ import annotations

from pathlib import Path

from bigmodel.config.schema import Config, DataConfig
from bigmodel.config.validate import microbatches_per_step
from bigmodel.data.dataset import ImageTextDataset, PairSource
from bigmodel.data.loader import EvalLoader, GlobalBatchLoader
from bigmodel.data.locations import ReadOptions
from bigmodel.data.shapes import ShapesSource
from bigmodel.data.shards import IndexedShards
from bigmodel.data.streaming import StreamingEvalLoader, StreamingLoader, StreamShards, read_mode
from bigmodel.data.tokenizer import CaptionTokenizer, load_tokenizer


def build_tokenizer(cfg: DataConfig) -> CaptionTokenizer:
    """The tokenizer named by data.tokenizer ("builtin", a tokenizer.json or a transformers tokenizer folder)."""
    return load_tokenizer(cfg.tokenizer)


def _checked_tokenizer(cfg: Config) -> CaptionTokenizer:
    """The run's tokenizer, after checking it fits model.vocab_size and has [MASK] when the MLM loss is on."""
    tokenizer = build_tokenizer(cfg.data)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size is {cfg.model.vocab_size} but tokenizer {cfg.data.tokenizer!r} has "
            f"{tokenizer.vocab_size} ids; set model.vocab_size to at least {tokenizer.vocab_size}"
        )
    if tokenizer.mask_id is None and cfg.train.loss_weights.mlm > 0:
        path = Path(cfg.data.tokenizer)
        path = path / "tokenizer.json" if path.is_dir() else path
        raise ValueError(
            f"train.loss_weights.mlm={cfg.train.loss_weights.mlm} needs a mask token, which tokenizer "
            f"{cfg.data.tokenizer!r} lacks; set train.loss_weights.mlm=0, or add [MASK] (one more id for "
            f"model.vocab_size): python -c \"from tokenizers import Tokenizer; t = Tokenizer.from_file('{path}'); "
            f"t.add_special_tokens(['[MASK]']); t.save('{path}')\""
        )
    return tokenizer


def _indexed_shards(cfg: DataConfig, spec: str) -> IndexedShards:
    """The `::`-joined shards `spec` read by byte ranges through their indexes (data.index_dir, data.retries,
    data.caption_key)."""
    return IndexedShards(spec, cfg.index_dir, ReadOptions(retries=cfg.retries), cfg.caption_key)


def _train_source(cfg: Config) -> PairSource:
    if cfg.data.source == "shapes":
        return ShapesSource("train", cfg.data.train_size, cfg.model.image_size, cfg.data.max_shapes)
    if not cfg.data.train_shards:
        raise ValueError(
            "data.train_shards is empty; with data.source shards give a pattern such as data/train-{000000..000009}.tar"
        )
    return _indexed_shards(cfg.data, cfg.data.train_shards)


def _eval_source(cfg: Config) -> PairSource | None:
    if cfg.data.source == "shapes":
        return ShapesSource("eval", cfg.data.eval_size, cfg.model.image_size, cfg.data.max_shapes)
    return _indexed_shards(cfg.data, cfg.data.eval_shards) if cfg.data.eval_shards else None


def build_train_loader(cfg: Config, dp_rank: int = 0, dp_size: int = 1) -> GlobalBatchLoader | StreamingLoader:
    """This data-parallel rank's loader of training batches (global batch train.global_batch_size, seed
    train.seed, augmentation per data.augment, patch_keep per model.patch_dropout), in the read mode of data.mode
    (see `read_mode`).

    Indexed: each local batch holds this rank's share of each of the train.grad_accum microbatches in turn (see
    GlobalBatchLoader); streaming: see StreamingLoader. Raises ValueError (naming the field to fix) if the
    tokenizer needs more ids than model.vocab_size, the shards are missing, the global batch does not split evenly
    over dp_size ranks or a streaming-only setting meets the indexed mode.
    """
    if read_mode(cfg.data, cfg.data.train_shards) == "streaming":
        dataset = ImageTextDataset(None, _checked_tokenizer(cfg), cfg, augment=cfg.data.augment, drop_patches=True)
        return StreamingLoader(dataset, StreamShards.from_spec(cfg.data.train_shards), cfg, dp_rank, dp_size)
    _refuse_streaming_settings(cfg.data)
    source = _train_source(cfg)
    dataset = ImageTextDataset(source, _checked_tokenizer(cfg), cfg, augment=cfg.data.augment, drop_patches=True)
    return GlobalBatchLoader(
        dataset,
        cfg.train.global_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.train.seed,
        num_workers=cfg.data.num_workers,
        microbatches=microbatches_per_step(cfg),
    )


def _refuse_streaming_settings(cfg: DataConfig) -> None:
    """ValueError (one line) for data.train_weights or data.resampled in the indexed mode."""
    field = "data.train_weights" if cfg.train_weights else "data.resampled" if cfg.resampled else None
    if field is not None and cfg.source == "shards":
        raise ValueError(
            f"{field} needs data.mode=streaming, and data.mode={cfg.mode} reads these local shards indexed; "
            "set data.mode=streaming"
        )


def build_eval_loader(cfg: Config, batch_size: int) -> EvalLoader | StreamingEvalLoader | None:
    """The held-out split in fixed order, without augmentation; None when there is none (empty data.eval_shards).

    Every rank that calls it gets the whole split (in the streaming mode: each shard read front to back).
    """
    if read_mode(cfg.data, cfg.data.eval_shards) == "streaming":
        dataset = ImageTextDataset(None, _checked_tokenizer(cfg), cfg, augment=False)
        return StreamingEvalLoader(dataset, StreamShards.from_spec(cfg.data.eval_shards), batch_size, cfg)
    source = _eval_source(cfg)
    if source is None:
        return None
    return EvalLoader(ImageTextDataset(source, _checked_tokenizer(cfg), cfg, augment=False), batch_size)
