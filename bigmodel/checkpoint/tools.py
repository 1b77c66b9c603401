"""Working with saved checkpoints from one process, whatever layout wrote them: inspect, compare, consolidate into
one safetensors file, and convert to and from transformers' CLIPModel.

Every function reads the model's tensors one at a time (DCP reshards each to a whole tensor on load), so its peak
memory is about the largest tensor, except export_hf and import_hf, which hold the whole CLIPModel as transformers
does. Paths may name a step_* folder, a checkpoints/ folder or a run directory (see resolve_checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from bigmodel.checkpoint.hf import (
    bigmodel_key,
    clip_config_from_model_config,
    clip_key,
    clip_to_bigmodel_state_dict,
    model_config_from_clip_config,
)
from bigmodel.checkpoint.run import resolve_checkpoint, save_checkpoint
from bigmodel.checkpoint.sharded import MANIFEST_FILE, read_manifest, verify_manifest

MODEL_PREFIX = "model."

# torch dtype -> safetensors' dtype code (https://github.com/huggingface/safetensors, format.md).
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def saved_config(path: Path) -> dict[str, Any]:
    """The resolved config dict the checkpoint at `path` was saved with; ValueError (one line) if it has none."""
    config = read_manifest(path)["extra"].get("config")
    if config is None:
        raise ValueError(f"checkpoint {path} has no config in {MANIFEST_FILE}; it was not written by bigmodel train")
    return config


class _OnceReadReader(FileSystemReader):
    """A FileSystemReader that unpickles DCP's index once: dcp.load reads it again on every call, which dominates
    loading a checkpoint tensor by tensor (about 20 ms per call for a 300 kB index)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._metadata = super().read_metadata()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._metadata


class ModelTensors:
    """The model tensors of the checkpoint at `path`, listed from DCP's index and loaded one at a time.

    `shapes` maps each fqn (without "model.") to DCP's metadata (global size and dtype); `read(name)` returns the
    whole tensor, assembled from however many shards hold it.
    """

    def __init__(self, path: Path) -> None:
        self.reader = _OnceReadReader(path)
        self.shapes: dict[str, TensorStorageMetadata] = {
            key.removeprefix(MODEL_PREFIX): meta
            for key, meta in self.reader.read_metadata().state_dict_metadata.items()
            if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)
        }

    def read(self, name: str) -> torch.Tensor:
        meta = self.shapes[name]
        key = MODEL_PREFIX + name
        state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)}
        dcp.load(state, storage_reader=self.reader)
        return state[key]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(fqn, whole tensor) for every model tensor, sorted by name, one loaded at a time."""
        for name in sorted(self.shapes):
            yield name, self.read(name)


def _numel(meta: TensorStorageMetadata) -> int:
    return torch.Size(meta.size).numel()


def _checksum_status(path: Path) -> str:
    try:
        verify_manifest(path)
    except (ValueError, FileNotFoundError, KeyError) as err:
        return str(err)
    return "ok"


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """What the checkpoint at `path` holds, read from its manifest and DCP index (no tensor is loaded).

    Keys: path, step, format, layout (the ParallelDims it was saved from), world_size, torch, model (the saved
    model config), objectives, parameters (element count of the model tensors), model_bytes, files (name -> bytes)
    and checksums ("ok" or verify_manifest's error).
    """
    path = resolve_checkpoint(path)
    manifest = read_manifest(path)
    config = manifest["extra"].get("config") or {}
    tensors = ModelTensors(path).shapes
    weights = config.get("train", {}).get("loss_weights", {})
    return {
        "path": str(path),
        "step": manifest.get("step"),
        "format": manifest.get("format"),
        "layout": manifest.get("layout"),
        "world_size": manifest.get("world_size"),
        "torch": manifest.get("torch"),
        "model": config.get("model"),
        "objectives": [name for name, weight in weights.items() if weight > 0],
        "tensors": len(tensors),
        "parameters": sum(_numel(meta) for meta in tensors.values()),
        "model_bytes": sum(_numel(meta) * meta.properties.dtype.itemsize for meta in tensors.values()),
        "files": {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()},
        "checksums": _checksum_status(path),
    }


@dataclass(frozen=True)
class TensorDiff:
    """How one model tensor differs between checkpoints a and b.

    max_rel is max|a - b| / max(max|a|, max|b|): relative to the tensor's scale rather than per element, because
    elementwise ratios are meaningless where a weight is (near) zero, as biases start. Both are None unless
    status is "compared". ok: compared and max_abs <= the tolerance diff_checkpoints was given.
    """

    name: str
    status: Literal["compared", "only_in_a", "only_in_b", "shape_differs", "dtype_differs"]
    max_abs: float | None = None
    max_rel: float | None = None
    ok: bool = False


def diff_checkpoints(a: str | Path, b: str | Path, tol: float = 0.0) -> list[TensorDiff]:
    """One TensorDiff per model tensor present in either checkpoint, sorted by name; a pair is ok when its
    max_abs <= `tol`. Tensors are compared in float64, one pair loaded at a time."""
    a, b = resolve_checkpoint(a), resolve_checkpoint(b)
    tensors_a, tensors_b = ModelTensors(a), ModelTensors(b)
    in_a, in_b = tensors_a.shapes, tensors_b.shapes
    rows = []
    for name in sorted(in_a.keys() | in_b.keys()):
        if name not in in_b:
            rows.append(TensorDiff(name, "only_in_a"))
        elif name not in in_a:
            rows.append(TensorDiff(name, "only_in_b"))
        elif in_a[name].size != in_b[name].size:
            rows.append(TensorDiff(name, "shape_differs"))
        elif in_a[name].properties.dtype != in_b[name].properties.dtype:
            rows.append(TensorDiff(name, "dtype_differs"))
        else:
            x, y = tensors_a.read(name).double(), tensors_b.read(name).double()
            max_abs = (x - y).abs().max().item() if x.numel() else 0.0
            scale = max(x.abs().max().item(), y.abs().max().item()) if x.numel() else 0.0
            max_rel = max_abs / scale if scale > 0 else max_abs
            rows.append(TensorDiff(name, "compared", max_abs, max_rel, ok=max_abs <= tol))
    return rows


def consolidate(path: str | Path, out_file: str | Path) -> Path:
    """Write the model's full weights of the checkpoint at `path` to the safetensors file `out_file` (tensors named
    by fqn, without "model."), and the checkpoint's resolved config to config.json beside it. Returns out_file.

    Streams: the header is built from DCP's index, then each tensor is loaded and written in turn.
    """
    path, out_file = resolve_checkpoint(path), Path(out_file)
    config = saved_config(path)
    tensors = ModelTensors(path)
    shapes = sorted(tensors.shapes.items())
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "step": str(read_manifest(path).get("step"))}}
    offset = 0
    for name, meta in shapes:
        dtype = meta.properties.dtype
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name} has dtype {dtype}, which this writer does not support")
        size = _numel(meta) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(meta.size),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header so the data starts 8-byte aligned
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(out_file, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, _ in shapes:
            # safetensors stores little-endian data; so does every platform torch runs on.
            f.write(tensors.read(name).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    (out_file.parent / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out_file


def export_hf(path: str | Path, out_dir: str | Path) -> Path:
    """A transformers CLIPModel directory (config.json, model.safetensors) at `out_dir` computing what the
    checkpoint's dual encoder computes; loads with `CLIPModel.from_pretrained(out_dir)`. Returns out_dir.

    Only fusion none with the contrastive objective alone converts; anything else is a one-line ValueError.
    The token ids are bigmodel's fixed ones ([PAD]=0, [BOS]=3, [EOS]=4), which every bigmodel tokenizer uses.
    """
    from transformers import CLIPModel

    from bigmodel.config.load import config_from_dict

    path = resolve_checkpoint(path)
    cfg = config_from_dict(saved_config(path))
    if cfg.model.fusion != "none":
        raise ValueError(
            f"checkpoint {path} has model.fusion={cfg.model.fusion}; only model.fusion=none exports to CLIPModel "
            "for now"
        )
    clip = CLIPModel(clip_config_from_model_config(cfg.model))
    targets = clip.state_dict()
    filled = set()
    with torch.no_grad():
        for name, tensor in ModelTensors(path):
            target_name = clip_key(name)
            target = targets[target_name]
            if tensor.shape != target.shape and not tensor.numel() == target.numel() == 1:  # logit_scale: (1,), ()
                raise ValueError(
                    f"tensor {name} has shape {tuple(tensor.shape)}, CLIPModel's {target_name} {tuple(target.shape)}"
                )
            target.copy_(tensor.reshape(target.shape))
            filled.add(target_name)
    missing = sorted(name for name in targets.keys() - filled if bigmodel_key(name) is not None)
    if missing:
        raise ValueError(f"checkpoint {path} lacks the tensor for CLIPModel's {missing[0]}")
    out_dir = Path(out_dir)
    clip.save_pretrained(out_dir)
    return out_dir


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
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; import into a new directory")
    clip = CLIPModel.from_pretrained(hf_dir)
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
    return save_checkpoint(out, 0, engine, extra, keep=1, is_main=True)
