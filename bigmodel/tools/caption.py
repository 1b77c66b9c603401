"""Captions for image files from a captioning checkpoint, in one process, whatever layout trained it.

The checkpoint's model tensors are read whole, one at a time, from DCP (as `bigmodel.finetune` reads the image
tower), into a plain MultimodalEncoder built from the config the run saved; images go through the run's evaluation
transform, ids through the run's tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bigmodel.config.layout import active_objectives
from bigmodel.config.load import config_from_dict
from bigmodel.config.schema import Config
from bigmodel.data.build import build_tokenizer
from bigmodel.data.shards import BadSample, decode_image
from bigmodel.data.transforms import build_transform
from bigmodel.models.encoder import MultimodalEncoder
from bigmodel.models.generate import greedy_captions


def load_model(checkpoint: str | Path) -> tuple[Config, MultimodalEncoder]:
    """(the run's config, its whole model in eval mode on the CPU) from a checkpoint folder (a run directory, its
    checkpoints/ folder, one step_* folder, or a `ckpt reshard` output); ValueError (one line) for one that is not
    in the native sharded format or lacks a tensor of the model."""
    from bigmodel.checkpoint.manifest import verify_manifest
    from bigmodel.checkpoint.run import resolve_checkpoint
    from bigmodel.checkpoint.tools import ModelTensors, saved_config

    path = resolve_checkpoint(checkpoint)
    verify_manifest(path)
    cfg = config_from_dict(saved_config(path))
    with torch.device("meta"):
        model = MultimodalEncoder(cfg.model, active_objectives(cfg.train.loss_weights))
    tensors = ModelTensors(path)
    missing = sorted(set(model.state_dict()) - set(tensors.shapes))
    if missing:
        raise ValueError(f"checkpoint {path} lacks the model tensor {missing[0]}")
    model.load_state_dict({name: tensors.read(name) for name in model.state_dict()}, strict=True, assign=True)
    return cfg, model.eval()


def caption_images(checkpoint: str | Path, images: Sequence[str | Path], max_tokens: int | None = None) -> list[str]:
    """One greedy caption per image file (any format PIL reads), from the model of `checkpoint`; at most
    `max_tokens` tokens each (None: until EOS or the model's context length).

    ValueError (one line) for a checkpoint without a caption head, a tokenizer without a begin-of-text token, or an
    image that does not decode.
    """
    cfg, model = load_model(checkpoint)
    if "caption" not in model.objectives:
        raise ValueError(
            f"checkpoint {checkpoint} was trained without the captioning objective; train with "
            "train.loss_weights.caption > 0 (and model.text_causal=true, model.fusion=cross)"
        )
    tokenizer = build_tokenizer(cfg.data)
    if tokenizer.bos_id is None:
        raise ValueError(f"tokenizer {cfg.data.tokenizer!r} has no begin-of-text token to start a caption from")
    transform = build_transform(cfg, train=False)
    rng = np.random.default_rng(0)  # the evaluation transform draws nothing
    pixels = torch.stack([torch.from_numpy(transform(_read_image(Path(image)), rng)) for image in images])
    ids = greedy_captions(model, pixels, tokenizer.bos_id, tokenizer.eos_id, max_tokens)
    return [tokenizer.decode(row) for row in ids]


def _read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; ValueError naming the file if it does not decode."""
    try:
        return decode_image(path.read_bytes())
    except BadSample as error:
        raise ValueError(f"{path}: {error}") from None
