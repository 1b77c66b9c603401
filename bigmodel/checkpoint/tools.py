"""Working with saved checkpoints from one process, whatever layout wrote them: inspect, compare and consolidate
into one safetensors file (the transformers conversions, which use these readers, are in bigmodel.hf.convert).

Every function reads the model's tensors one at a time (DCP reshards each to a whole tensor on load), so its peak
memory is about the largest tensor. Paths may name a step_* folder, a checkpoints/ folder or a run directory (see
resolve_checkpoint).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from tqdm import tqdm

from bigmodel.checkpoint.io import return_freed_memory
from bigmodel.checkpoint.manifest import MANIFEST_FILE, read_manifest, verify_manifest
from bigmodel.checkpoint.run import resolve_checkpoint
from bigmodel.checkpoint.safe import OnceReadReader, load_dcp
from bigmodel.checkpoint.sharded import read_sharded_manifest

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
    config = read_manifest(path, "extra")["extra"].get("config")
    if config is None:
        raise ValueError(f"checkpoint {path} has no config in {MANIFEST_FILE}; it was not written by bigmodel train")
    return config


class ModelTensors:
    """The model tensors of the checkpoint at `path`, listed from DCP's index and loaded one at a time.

    `shapes` maps each fqn (without "model.") to DCP's metadata (global size and dtype); `read(name)` returns the
    whole tensor, assembled from however many shards hold it.
    """

    def __init__(self, path: Path) -> None:
        read_sharded_manifest(path)  # the offline tools read this format only
        self.reader = OnceReadReader(path)
        self.shapes: dict[str, TensorStorageMetadata] = {
            key.removeprefix(MODEL_PREFIX): meta
            for key, meta in self.reader.read_metadata().state_dict_metadata.items()
            if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)
        }

    def read(self, name: str) -> torch.Tensor:
        return_freed_memory()
        meta = self.shapes[name]
        key = MODEL_PREFIX + name
        state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)}
        load_dcp(state, self.reader, collective=False)
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
    manifest = read_manifest(path, "extra")
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


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor to write: its name, dtype and shape in the file, and how to read it (called once, when written)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]


def write_safetensors(
    out_file: Path, entries: list[SafetensorsEntry], metadata: dict[str, str], progress: bool = False
) -> Path:
    """Write `entries` to the safetensors file `out_file` one tensor at a time (the header first, from the entries'
    shapes), so memory stays near the largest tensor. Returns out_file."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        if entry.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {entry.name} has dtype {entry.dtype}, which this writer does not support")
        size = torch.Size(entry.shape).numel() * entry.dtype.itemsize
        header[entry.name] = {
            "dtype": _SAFETENSORS_DTYPES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header so the data starts 8-byte aligned
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(out_file, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for entry in tqdm(entries, desc=out_file.name, unit="tensor", disable=not progress):
            tensor = entry.read()
            if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise ValueError(f"tensor {entry.name} is {tensor.dtype} {tuple(tensor.shape)}, not {entry.shape}")
            # safetensors stores little-endian data; so does every platform torch runs on.
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    return out_file


def consolidate(path: str | Path, out_file: str | Path, progress: bool = False) -> Path:
    """Write the model's full weights of the checkpoint at `path` to the safetensors file `out_file` (tensors named
    by fqn, without "model."), and the checkpoint's resolved config to config.json beside it. Returns out_file.

    The checkpoint's files are checked against its manifest first (ValueError naming the first bad one). Streams
    tensor by tensor (write_safetensors); `progress` shows a bar.
    """
    path, out_file = resolve_checkpoint(path), Path(out_file)
    verify_manifest(path)
    config = saved_config(path)
    tensors = ModelTensors(path)
    entries = [
        SafetensorsEntry(name, meta.properties.dtype, tuple(meta.size), partial(tensors.read, name))
        for name, meta in sorted(tensors.shapes.items())
    ]
    write_safetensors(out_file, entries, {"format": "pt", "step": str(read_manifest(path).get("step"))}, progress)
    (out_file.parent / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out_file
