"""The image tower of a pretrained model, from any of the forms bigmodel writes, read without unpickling anything:

- a checkpoint folder (a run directory, checkpoints/ folder, step_* folder, or a `ckpt reshard` output): its
  `vision.*` tensors are read one at a time from DCP (bigmodel.checkpoint.safe);
- a `.safetensors` file from `ckpt consolidate` / `ckpt reshard --to single`, with config.json beside it;
- a directory from `ckpt export-hf`: a bigmodel_encoder or a CLIPModel (model.safetensors only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from bigmodel.config.load import config_from_dict
from bigmodel.config.schema import ModelConfig
from bigmodel.models.encoder import VisionTower

PREFIX = "vision."


def load_vision_tower(source: str | Path) -> tuple[ModelConfig, VisionTower]:
    """(the model config, the VisionTower with the pretrained weights) of `source` (see the module docstring).

    FileNotFoundError / ValueError (one line) for a path that is none of these or lacks a tower tensor.
    """
    source = Path(source)
    if source.suffix == ".safetensors":
        cfg, tensors = _consolidated(source)
    elif (source / "config.json").is_file() and (source / "model.safetensors").is_file():
        cfg, tensors = _exported(source)
    else:
        cfg, tensors = _checkpoint(source)
    tower = VisionTower(cfg)
    missing = sorted(set(tower.state_dict()) - set(tensors))
    if missing:
        raise ValueError(f"{source} lacks the image tower tensor vision.{missing[0]}")
    tower.load_state_dict(tensors, strict=True)
    return cfg, tower


def _consolidated(file: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config = file.parent / "config.json"
    if not file.is_file() or not config.is_file():
        raise FileNotFoundError(
            f"{file} and a config.json beside it are needed (as bigmodel ckpt consolidate writes them)"
        )
    cfg = config_from_dict(json.loads(config.read_text(encoding="utf-8"))).model
    return cfg, _read_safetensors(file, lambda name: _strip(name, PREFIX))


def _exported(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if raw.get("model_type") == "bigmodel_encoder":
        cfg = ModelConfig(**raw["model"])
        prefix = "encoder." + PREFIX
        return cfg, _read_safetensors(folder / "model.safetensors", lambda name: _strip(name, prefix))
    if raw.get("model_type") == "clip":
        from transformers import CLIPConfig

        from bigmodel.hf.clip import bigmodel_key, model_config_from_clip_config

        cfg = model_config_from_clip_config(CLIPConfig.from_dict(raw))

        def rename(name: str) -> str | None:
            ours = bigmodel_key(name) if name.startswith("vision_model.") else None
            return ours.removeprefix(PREFIX) if ours else None

        return cfg, _read_safetensors(folder / "model.safetensors", rename)
    raise ValueError(
        f"{folder}/config.json has model_type {raw.get('model_type')!r}, neither bigmodel_encoder nor clip; export "
        "the model with bigmodel ckpt export-hf"
    )


def _strip(name: str, prefix: str) -> str | None:
    return name.removeprefix(prefix) if name.startswith(prefix) else None


def _checkpoint(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from bigmodel.checkpoint.manifest import verify_manifest
    from bigmodel.checkpoint.run import resolve_checkpoint
    from bigmodel.checkpoint.tools import ModelTensors, saved_config

    path = resolve_checkpoint(path)
    verify_manifest(path)
    cfg = config_from_dict(saved_config(path)).model
    tensors = ModelTensors(path)
    return cfg, {n.removeprefix(PREFIX): tensors.read(n) for n in sorted(tensors.shapes) if n.startswith(PREFIX)}


def _read_safetensors(file: Path, rename) -> dict[str, torch.Tensor]:
    """The tensors of `file` that `rename` maps to a tower name (None: skip), read one at a time."""
    out = {}
    with safe_open(file, framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            ours = rename(name)
            if ours is not None:
                out[ours] = f.get_tensor(name)
    return out
