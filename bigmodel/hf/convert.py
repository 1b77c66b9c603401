"""Checkpoints to and from transformers: `export_hf` writes a transformers directory (CLIPModel, or bigmodel's
AutoModel type for fused models) tensor by tensor; `import_hf` turns a CLIPModel directory into a bigmodel run.

export_hf streams the checkpoint's tensors one at a time; import_hf holds the whole CLIPModel, as transformers does.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bigmodel.checkpoint.manifest import verify_manifest
from bigmodel.checkpoint.run import resolve_checkpoint
from bigmodel.checkpoint.tools import ModelTensors, SafetensorsEntry, saved_config, write_safetensors
from bigmodel.hf.clip import (
    bigmodel_key,
    clip_config_from_model_config,
    clip_to_bigmodel_state_dict,
    model_config_from_clip_config,
)


def export_hf(path: str | Path, out_dir: str | Path, progress: bool = False) -> Path:
    """A transformers directory (config.json, model.safetensors) at `out_dir` computing what the checkpoint's model
    computes, written tensor by tensor. Returns out_dir.

    fusion none with the contrastive objective alone: a CLIPModel (`CLIPModel.from_pretrained(out_dir)` or
    `AutoModel.from_pretrained(out_dir)`, no custom code). Any other model: a `bigmodel.hf.BigmodelModel` that
    `AutoModel.from_pretrained(out_dir)` loads after `import bigmodel.hf`. The CLIP token ids are bigmodel's fixed
    ones ([PAD]=0, [BOS]=3, [EOS]=4), which every bigmodel tokenizer uses. The files are checked against the
    manifest first.
    """
    from bigmodel.config.load import config_from_dict

    path, out_dir = resolve_checkpoint(path), Path(out_dir)
    verify_manifest(path)
    saved = saved_config(path)
    cfg = config_from_dict(saved)
    tensors = ModelTensors(path)
    objectives = [name for name, weight in saved["train"]["loss_weights"].items() if weight > 0]
    metadata = {"format": "pt"}
    if cfg.model.fusion != "none" or objectives != ["contrastive"]:
        from bigmodel.hf import BigmodelConfig

        BigmodelConfig(model=dataclasses.asdict(cfg.model), objectives=objectives).save_pretrained(out_dir)
        entries = [
            SafetensorsEntry(f"encoder.{name}", meta.properties.dtype, tuple(meta.size), partial(tensors.read, name))
            for name, meta in sorted(tensors.shapes.items())
        ]
        write_safetensors(out_dir / "model.safetensors", entries, metadata, progress)
        return out_dir
    clip_config = clip_config_from_model_config(cfg.model)
    clip_config.save_pretrained(out_dir)
    write_safetensors(out_dir / "model.safetensors", _clip_entries(path, tensors, clip_config), metadata, progress)
    return out_dir


def _clip_entries(path: Path, tensors: ModelTensors, clip_config: Any) -> list[SafetensorsEntry]:
    """CLIPModel's tensors, each read from the bigmodel tensor it maps to; shapes from a CLIPModel on the meta
    device (which holds no memory). ValueError (one line) for a missing or misshapen tensor."""
    from transformers import CLIPModel

    with torch.device("meta"):
        targets = CLIPModel(clip_config).state_dict()
    entries = []
    for clip_name, target in sorted(targets.items()):
        name = bigmodel_key(clip_name)
        if name is None:  # a buffer CLIPModel rebuilds
            continue
        if name not in tensors.shapes:
            raise ValueError(f"checkpoint {path} lacks the tensor for CLIPModel's {clip_name}")
        size = tensors.shapes[name].size
        if tuple(size) != tuple(target.shape) and not size.numel() == target.numel() == 1:  # logit_scale: (1,), ()
            raise ValueError(f"tensor {name} has shape {tuple(size)}, CLIPModel's {clip_name} {tuple(target.shape)}")

        def read(name: str = name, shape: torch.Size = target.shape) -> torch.Tensor:
            return tensors.read(name).reshape(shape)

        entries.append(SafetensorsEntry(clip_name, target.dtype, tuple(target.shape), read))
    extra = sorted(set(tensors.shapes) - {bigmodel_key(n) for n in targets})
    if extra:
        raise ValueError(f"bigmodel tensor {extra[0]!r} has no CLIPModel counterpart")
    return entries


def require_safetensors(hf_dir: Path) -> None:
    """FileNotFoundError (one line) unless the transformers directory `hf_dir` holds its weights as safetensors:
    bigmodel never reads pytorch_model.bin, a pickle that can run code when loaded."""
    if not any((hf_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise FileNotFoundError(
            f"{hf_dir} has no model.safetensors; bigmodel loads only safetensors weights (a pytorch_model.bin is a "
            "pickle that can run code), so save the model with save_pretrained(..., safe_serialization=True)"
        )


def import_hf(hf_dir: str | Path, out: str | Path, tokenizer: str = "builtin") -> Path:
    """Turn the CLIPModel directory `hf_dir` into a bigmodel run directory `out`: config.yaml and a step-0
    checkpoint that `bigmodel eval OUT` evaluates and `--checkpoint.resume=OUT` continues. Returns the checkpoint.

    The config is the defaults with CLIP's model (fusion none), the contrastive objective only and `tokenizer`,
    whose vocabulary must fit CLIP's. ValueError (one line) if `out` is not empty or the tokenizer does not fit.
    """
    from transformers import CLIPModel

    from bigmodel.config.load import config_from_dict, config_to_dict, save_config
    from bigmodel.data import build_train_loader
    from bigmodel.data.tokenizer import load_tokenizer
    from bigmodel.engines.native import NativeEngine
    from bigmodel.parallel.context import setup_parallel

    hf_dir, out = Path(hf_dir), Path(out)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not a transformers model directory (no config.json)")
    require_safetensors(hf_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; import into a new directory")
    clip = CLIPModel.from_pretrained(hf_dir, use_safetensors=True)
    model = model_config_from_clip_config(clip.config)
    vocab = load_tokenizer(tokenizer).vocab_size
    if vocab > model.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer} has {vocab} ids but the CLIP model only {model.vocab_size}; pass a tokenizer.json "
            "whose vocabulary fits"
        )
    cfg = config_from_dict(
        {
            "model": dataclasses.asdict(model),
            "data": {"tokenizer": tokenizer},
            "train": {"out_dir": str(out), "loss_weights": {"contrastive": 1.0, "itm": 0.0, "mlm": 0.0}},
        }
    )
    engine = NativeEngine(cfg, setup_parallel(cfg))
    engine.model.load_state_dict(clip_to_bigmodel_state_dict(clip.state_dict()))
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    extra = {
        "samples_seen": 0,
        "loader": build_train_loader(cfg).state_dict(),
        "config": config_to_dict(cfg),
        "imported_from": str(hf_dir),
    }
    return engine.save_checkpoint(out, 0, extra, keep=1).path
