"""Single-process checkpoints: model weights as safetensors, training state as a torch file, a JSON manifest.

Layout of one checkpoint, `<out_dir>/checkpoints/step_00000100/`:
  model.safetensors   the model's parameters (fp32), loadable with safetensors alone
  train_state.pt      optimizer, LR schedule, data-loader position and RNG states
  manifest.json       step, samples seen, the resolved config
A checkpoint is written to a temporary folder and renamed when complete; `latest` (a text file holding the
folder name) is replaced atomically afterwards. The sharded multi-process format is a later addition.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"


def rng_state() -> dict[str, Any]:
    """The RNG states that affect training in this process (dropout draws from torch's global generator)."""
    return {"torch": torch.get_rng_state()}


def save_checkpoint(
    ckpt_root: Path, step: int, engine_state: dict[str, Any], extra: dict[str, Any], manifest: dict[str, Any], keep: int
) -> Path:
    """Write checkpoint `step` under `ckpt_root`, point `latest` at it, and delete all but the newest `keep`."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {name: t.detach().contiguous().cpu() for name, t in engine_state["model"].items()}
    save_file(weights, str(tmp / MODEL_FILE))
    torch.save({k: v for k, v in engine_state.items() if k != "model"} | extra | {"rng": rng_state()}, tmp / STATE_FILE)
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest | {"step": step}, indent=2), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer_tmp = ckpt_root / f".{LATEST_FILE}.tmp"
    pointer_tmp.write_text(final.name, encoding="utf-8")
    os.replace(pointer_tmp, ckpt_root / LATEST_FILE)
    for old in sorted(ckpt_root.glob("step_*"))[:-keep]:
        shutil.rmtree(old)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a checkpoints/ root (its latest) or a run directory."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if (root / LATEST_FILE).is_file():
            return root / (root / LATEST_FILE).read_text(encoding="utf-8").strip()
    if (path / MODEL_FILE).is_file():
        return path
    raise FileNotFoundError(
        f"no checkpoint at {path}; pass a run directory, its checkpoints/ folder or a step_* folder with {MODEL_FILE}"
    )


def load_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict stored in the checkpoint at `path` (see resolve_checkpoint)."""
    return load_file(str(resolve_checkpoint(path) / MODEL_FILE))
