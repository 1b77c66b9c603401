"""Working with saved checkpoints from one process, whatever layout wrote them: inspect, compare, consolidate into
one safetensors file, and convert to and from transformers' CLIPModel.

Every function reads the model's tensors one at a time (DCP reshards each to a whole tensor on load), so its peak
memory is about the largest tensor, except export_hf and import_hf, which hold the whole CLIPModel as transformers
does. Paths may name a step_* folder, a checkpoints/ folder or a run directory (see resolve_checkpoint).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
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

from bigmodel.checkpoint.hf import (
    bigmodel_key,
    clip_config_from_model_config,
    clip_to_bigmodel_state_dict,
    model_config_from_clip_config,
)
from bigmodel.checkpoint.run import resolve_checkpoint, save_checkpoint
from bigmodel.checkpoint.safe import OnceReadReader, load_dcp
from bigmodel.checkpoint.sharded import MANIFEST_FILE, read_manifest, read_sharded_manifest, verify_manifest

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


def return_freed_memory() -> None:
    """Hand the heap's freed blocks back to the OS (glibc's malloc_trim; a no-op elsewhere).

    The streaming tools free each tensor before reading the next, but glibc keeps freed multi-MB blocks in the heap
    (its mmap threshold grows after the first large frees), so the resident size would creep up by a few tensors'
    worth of fragments; trimming once per tensor keeps the peak at what is really held."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


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
    return save_checkpoint(out, 0, engine, extra, keep=1)
