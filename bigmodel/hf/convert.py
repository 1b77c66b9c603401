"""Checkpoints to and from transformers: `export_hf` writes a transformers directory (CLIPModel, or bigmodel's
AutoModel type for fused models) tensor by tensor, with the run's tokenizer and image preprocessing; `import_hf`
turns a CLIPModel directory, with its tokenizer, into a bigmodel run.

export_hf streams the checkpoint's tensors one at a time; import_hf holds the whole CLIPModel, as transformers does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bigmodel.checkpoint.manifest import verify_manifest
from bigmodel.checkpoint.run import resolve_checkpoint
from bigmodel.checkpoint.tools import ModelTensors, SafetensorsEntry, saved_config, write_safetensors
from bigmodel.config.schema import Config, ModelConfig
from bigmodel.data.tokenizer import CaptionTokenizer, holds_tokenizer, load_tokenizer
from bigmodel.hf.clip import (
    bigmodel_key,
    clip_config_from_model_config,
    clip_to_bigmodel_state_dict,
    model_config_from_clip_config,
)
from bigmodel.hf.processing import image_processor, save_tokenizer

TOKENIZER_DIR = "tokenizer"
"""The folder of an imported run that keeps the model's tokenizer (its config's data.tokenizer points there)."""
_LEGACY_EOS = 2  # transformers' CLIP pools at argmax(input_ids) for this eos_token_id: the highest id, not a token


def export_hf(path: str | Path, out_dir: str | Path, progress: bool = False) -> Path:
    """A transformers directory (config.json, model.safetensors, tokenizer files, preprocessor_config.json) at
    `out_dir` computing what the checkpoint's model computes, written tensor by tensor. Returns out_dir.

    fusion none with the contrastive objective alone: a CLIPModel (`CLIPModel.from_pretrained(out_dir)` or
    `AutoModel.from_pretrained(out_dir)`, no custom code) whose pad/bos/eos ids are the run's tokenizer's. Any
    other model: a `bigmodel.hf.BigmodelModel` that `AutoModel.from_pretrained(out_dir)` loads after
    `import bigmodel.hf`. `CLIPProcessor.from_pretrained(out_dir)` prepares captions and images as the run does
    (see `bigmodel.hf.processing`). The files are checked against the manifest first; the run's data.tokenizer
    must still be readable.
    """
    from bigmodel.config.load import config_from_dict

    path, out_dir = resolve_checkpoint(path), Path(out_dir)
    verify_manifest(path)
    saved = saved_config(path)
    cfg = config_from_dict(saved)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    tensors = ModelTensors(path)
    objectives = [name for name, weight in saved["train"]["loss_weights"].items() if weight > 0]
    metadata = {"format": "pt"}
    _save_preprocessing(cfg, tokenizer, out_dir)
    if cfg.model.fusion != "none" or objectives != ["contrastive"]:
        from bigmodel.hf import BigmodelConfig

        BigmodelConfig(model=dataclasses.asdict(cfg.model), objectives=objectives).save_pretrained(out_dir)
        entries = [
            SafetensorsEntry(f"encoder.{name}", meta.properties.dtype, tuple(meta.size), partial(tensors.read, name))
            for name, meta in sorted(tensors.shapes.items())
        ]
        write_safetensors(out_dir / "model.safetensors", entries, metadata, progress)
        return out_dir
    clip_config = clip_config_from_model_config(
        cfg.model, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id
    )
    clip_config.save_pretrained(out_dir)
    write_safetensors(out_dir / "model.safetensors", _clip_entries(path, tensors, clip_config), metadata, progress)
    return out_dir


def _save_preprocessing(cfg: Config, tokenizer: CaptionTokenizer, out_dir: Path) -> None:
    """The run's tokenizer and (for RGB models) its image preprocessing, as CLIPProcessor reads them."""
    save_tokenizer(tokenizer, out_dir, cfg.model.context_length)
    processor = image_processor(cfg)
    if processor is not None:
        processor.save_pretrained(str(out_dir))


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


def _checked_import_tokenizer(spec: str, clip_config: Any, vocab_size: int) -> CaptionTokenizer:
    """The tokenizer `spec`, after checking it fits the model and ends captions where the model pools."""
    tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer {spec} has {tokenizer.vocab_size} ids but the CLIP model only {vocab_size}; import with the "
            "model's own tokenizer"
        )
    eos = clip_config.text_config.eos_token_id
    if eos == _LEGACY_EOS and tokenizer.eos_id != tokenizer.vocab_size - 1:
        raise ValueError(
            f"the CLIP model's eos_token_id is 2 (transformers' legacy rule: pool at the highest id), but tokenizer "
            f"{spec}'s end-of-text id {tokenizer.eos_id} is not its highest; import with the model's own tokenizer"
        )
    if eos not in (_LEGACY_EOS, tokenizer.eos_id):
        raise ValueError(
            f"tokenizer {spec} ends captions with id {tokenizer.eos_id} but the CLIP model pools at eos_token_id "
            f"{eos}; import with the model's own tokenizer (save_pretrained it into the model folder, or --tokenizer)"
        )
    return tokenizer


def import_hf(hf_dir: str | Path, out: str | Path, tokenizer: str | None = None) -> Path:
    """Turn the CLIPModel directory `hf_dir` into a bigmodel run directory `out`: config.yaml, the tokenizer (in
    out/tokenizer, which the config's data.tokenizer names) and a step-0 checkpoint that `bigmodel eval OUT`
    evaluates and `--checkpoint.resume=OUT` continues. Returns the checkpoint.

    `tokenizer` (a data.tokenizer value) defaults to the tokenizer saved in hf_dir (tokenizer.json, or vocab.json
    + merges.txt), else builtin. The config is the defaults with CLIP's model (fusion none), the contrastive
    objective only and that tokenizer. ValueError (one line) if `out` is not empty, or the tokenizer has more ids
    than the model or another end-of-text id than the model's eos_token_id (with transformers' legacy
    eos_token_id 2, which pools at the highest id: unless the tokenizer's end-of-text id is its highest).
    """
    from transformers import CLIPModel

    hf_dir, out = Path(hf_dir), Path(out)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not a transformers model directory (no config.json)")
    require_safetensors(hf_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; import into a new directory")
    clip = CLIPModel.from_pretrained(hf_dir, use_safetensors=True)
    model = model_config_from_clip_config(clip.config)
    if tokenizer is None:
        tokenizer = str(hf_dir) if holds_tokenizer(hf_dir) else "builtin"
    kept = _checked_import_tokenizer(tokenizer, clip.config, model.vocab_size)
    return save_imported_run(model, clip_to_bigmodel_state_dict(clip.state_dict()), kept, out, str(hf_dir))


def save_imported_run(
    model: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    tokenizer: CaptionTokenizer,
    out: Path,
    source: str,
    data: Mapping[str, Any] | None = None,
) -> Path:
    """Write the run directory `out` of an imported dual encoder (fusion none, contrastive only): config.yaml (the
    defaults with `model`, the tokenizer, the contrastive objective and the `data` fields given), the tokenizer
    in out/tokenizer and a step-0 checkpoint of `state_dict` (strictly loaded). Returns the checkpoint."""
    from bigmodel.config.load import config_from_dict, config_to_dict, save_config
    from bigmodel.data import build_train_loader
    from bigmodel.engines.native import NativeEngine
    from bigmodel.parallel.context import setup_parallel

    save_tokenizer(tokenizer, out / TOKENIZER_DIR, model.context_length)
    cfg = config_from_dict(
        {
            "model": dataclasses.asdict(model),
            "data": {**(data or {}), "tokenizer": str((out / TOKENIZER_DIR).absolute())},
            "train": {"out_dir": str(out), "loss_weights": {"contrastive": 1.0, "itm": 0.0, "mlm": 0.0}},
        }
    )
    engine = NativeEngine(cfg, setup_parallel(cfg))
    engine.model.load_state_dict(state_dict)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    extra = {
        "samples_seen": 0,
        "loader": build_train_loader(cfg).state_dict(),
        "config": config_to_dict(cfg),
        "imported_from": source,
    }
    return engine.save_checkpoint(out, 0, extra, keep=1).path
