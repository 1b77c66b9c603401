"""Offline resharding: rewrite a checkpoint so that its storage is cut the way a target layout reads it.

A bigmodel checkpoint loads into any layout as it is (its tensors are stored under the unsplit model's names and DCP
reshards on load), so resharding is not needed for correctness. What it buys is I/O: DCP stores one chunk per saving
rank's slice, and a loading rank whose slice cuts across stored chunks reads each overlapping chunk whole and narrows
it. After `reshard_checkpoint(src, out, layout)` every stored chunk is exactly one target rank's slice of one tensor
(its tensor-parallel, ZeRO-3 and pipeline share), written to that rank's own file `__<rank>_0.distcp`: each rank of
the target layout reads only the bytes it keeps. A slice that several ranks need (data-parallel replicas under ZeRO
0-2 and HSDP, replicated tensors, hyper-parameters and the schedule) is stored once, in the file of the lowest rank
that needs it.

The target layout is validated against the checkpoint's model (`ParallelDims.check_layout`), and the slices come
from the same code the engines use: pipeline stages from `plan_stages` / `PipelineStageModel`, tensor-parallel
dimensions from the block plan, ZeRO-3 as FSDP2 cuts dim 0. Tensors are read and written one at a time, so memory
stays near the largest tensor (twice it: a slice that is not contiguous is copied out to be written).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.checkpoint.filesystem import _StorageInfo  # DCP's own storage record, as its writer uses
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from tqdm import tqdm

from bigmodel.checkpoint.io import return_freed_memory
from bigmodel.checkpoint.manifest import MANIFEST_FILE, checksums, read_manifest, verify_manifest
from bigmodel.checkpoint.records import tensor_bytes
from bigmodel.checkpoint.run import resolve_checkpoint
from bigmodel.checkpoint.safe import OnceReadReader, load_dcp
from bigmodel.checkpoint.sharded import read_sharded_manifest
from bigmodel.checkpoint.tools import consolidate, saved_config
from bigmodel.config.load import config_from_dict
from bigmodel.config.schema import Config, ParallelConfig
from bigmodel.losses import active_objectives
from bigmodel.models.encoder import MultimodalEncoder
from bigmodel.models.layers import Block
from bigmodel.parallel.dims import ParallelDims
from bigmodel.parallel.pipeline import PipelineStageModel, plan_stages
from bigmodel.parallel.tensor_parallel import block_plan

Slice = tuple[tuple[int, ...], tuple[int, ...]]
"""(offsets, sizes) of a rectangular piece of a tensor, as DCP's ChunkStorageMetadata describes it."""


def target_layout(
    path: str | Path, tp: int, pp: int, dp: int, zero_stage: int | None = None, **parallel: Any
) -> ParallelConfig:
    """The layout tp x pp x dp (dp on `dp_shard`) for the checkpoint at `path`: its saved parallel settings (pipeline
    schedule, microbatches, ...) with these degrees, overridden by `parallel` (ParallelConfig fields). zero_stage
    defaults to the saved one when dp > 1, else 0."""
    saved = saved_config(resolve_checkpoint(path)).get("parallel", {})
    if zero_stage is None:
        zero_stage = saved.get("zero_stage", 0) if dp > 1 else 0
    degrees = {"tp": tp, "pp": pp, "dp_shard": dp, "dp_replicate": 1, "zero_stage": zero_stage}
    if pp == 1:
        degrees["microbatches"] = 1  # pipeline microbatches exist only with a pipeline
    return ParallelConfig(**(saved | degrees | parallel))


class RankSlices:
    """Which ranks of a layout read which slice of each stored tensor, from the layout's own planning code.

    Ranks follow ParallelDims.build_meshes: rank = ((pp * dp_replicate + r) * dp_shard + s) * tp + t.
    """

    def __init__(self, cfg: Config) -> None:
        self.dims = ParallelDims.from_config(cfg)
        objectives = active_objectives(cfg.train.loss_weights)
        with torch.device("meta"):
            if self.dims.pp == 1:
                parts = [(0, MultimodalEncoder(cfg.model, objectives))]
            else:
                plans = plan_stages(cfg, objectives)
                parts = [(plan.index % self.dims.pp, PipelineStageModel(cfg.model, objectives, plan)) for plan in plans]
        self.stage_of: dict[str, int] = {}
        self.tp_dim: dict[str, int | None] = {}
        for pp_rank, module in parts:
            for name, _ in module.named_parameters():
                self.stage_of[name] = pp_rank
            self.tp_dim.update(tensor_parallel_dims(module, self.dims.sp) if self.dims.tp > 1 else {})

    def ranks(self, pp_rank: int) -> Iterator[tuple[int, int, int]]:
        """(rank, dp_shard index, tp index) of every rank of pipeline rank `pp_rank`."""
        d = self.dims
        for r in range(d.dp_replicate):
            for s in range(d.dp_shard):
                for t in range(d.tp):
                    yield ((pp_rank * d.dp_replicate + r) * d.dp_shard + s) * d.tp + t, s, t

    def slices(self, key: str, shape: torch.Size) -> dict[Slice, list[int]]:
        """Each distinct slice of the stored tensor `key` and the ranks that read it (ascending); empty slices of
        uneven ZeRO-3 shards are left out."""
        param, kind = _param_of(key)
        pp_ranks = range(self.dims.pp) if param is None else [self._stage(param, key)]
        shards = self.dims.dp_shard if kind == "tensor" and self.dims.zero_stage == 3 else 1
        tp_dim = self.tp_dim.get(param) if kind == "tensor" else None
        out: dict[Slice, list[int]] = {}
        for pp_rank in pp_ranks:
            for rank, s, t in self.ranks(pp_rank):
                piece = _cut(shape, tp_dim, t, self.dims.tp, s if shards > 1 else 0, shards)
                if piece is not None:
                    out.setdefault(piece, []).append(rank)
        return out

    def _stage(self, param: str, key: str) -> int:
        if param not in self.stage_of:
            raise ValueError(f"checkpoint tensor {key} belongs to no parameter of the target model ({param})")
        return self.stage_of[param]


def _param_of(key: str) -> tuple[str | None, Literal["tensor", "scalar", "other"]]:
    """The parameter a stored key belongs to, and how it is laid out: "tensor" (the parameter's shape and split),
    "scalar" (a whole value every rank holding the parameter reads: AdamW's step, hyper-parameters) or "other" (the
    schedule: every rank). Keys follow the engines' state_dict form (bigmodel.checkpoint.sharded)."""
    if key.startswith("model."):
        return key.removeprefix("model."), "tensor"
    if key.startswith("optim.state."):
        param, _, field = key.removeprefix("optim.state.").rpartition(".")
        return param, "scalar" if field == "step" else "tensor"
    if key.startswith("optim.param_groups."):  # one item per parameter (records.pack_hyperparameters)
        return key.removeprefix("optim.param_groups."), "scalar"
    return None, "other"


def tensor_parallel_dims(model: nn.Module, sequence_parallel: bool) -> dict[str, int | None]:
    """The dimension each parameter of `model` is split on by bigmodel.parallel.tensor_parallel (None: replicated),
    read from the block plan and the vocabulary-parallel embedding and decoder."""
    styles: dict[str, object] = {}
    for name, module in model.named_modules():
        if isinstance(module, Block):
            styles |= {f"{name}.{sub}": style for sub, style in block_plan(module, sequence_parallel).items()}
    styles["text.token_embedding"] = RowwiseParallel()  # apply_vocab_parallel_embedding
    styles["mlm_head.decoder"] = ColwiseParallel()  # apply_vocab_parallel_decoder
    styles["caption_head.decoder"] = ColwiseParallel()
    dims: dict[str, int | None] = {}
    for name, _ in model.named_parameters():
        module_name, _, kind = name.rpartition(".")
        style = styles.get(module_name)
        embedding = isinstance(model.get_submodule(module_name), nn.Embedding) if module_name else False
        if isinstance(style, ColwiseParallel):
            dims[name] = 1 if embedding else 0  # weight (out, in) and bias (out,) split on out
        elif isinstance(style, RowwiseParallel):
            dims[name] = 0 if embedding else (1 if kind == "weight" else None)  # the bias is added once, replicated
        else:
            dims[name] = None
    return dims


def _cut(shape: torch.Size, tp_dim: int | None, t: int, tp: int, s: int, shards: int) -> Slice | None:
    """Tensor-parallel piece `t` of `tp` along tp_dim, then ZeRO-3 piece `s` of `shards` along dim 0 of that (as
    FSDP2 cuts a DTensor's local tensor: torch.chunk sizes); None if empty."""
    offsets, sizes = [0] * len(shape), list(shape)
    if tp_dim is not None:
        offsets[tp_dim], sizes[tp_dim] = _chunk(sizes[tp_dim], t, tp)
    if shards > 1 and shape:
        start, length = _chunk(sizes[0], s, shards)
        offsets[0], sizes[0] = offsets[0] + start, length
    if any(size == 0 for size in sizes):
        return None
    return tuple(offsets), tuple(sizes)


def _chunk(n: int, i: int, parts: int) -> tuple[int, int]:
    """(start, length) of piece i of torch.chunk(range(n), parts)."""
    step = -(-n // parts)
    start = min(i * step, n)
    return start, min(step, n - start)


class _RankFiles:
    """Appends items to the per-rank files `__<rank>_0.distcp` of a folder and records where each went."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sizes: dict[str, int] = {}

    def append(self, rank: int, data: bytes | torch.Tensor) -> _StorageInfo:
        name = f"__{rank}_0.distcp"
        offset = self.sizes.get(name, 0)
        with open(self.folder / name, "ab") as f:
            f.write(tensor_bytes(data) if isinstance(data, torch.Tensor) else data)  # as RawRecordWriter stores them
            end = f.tell()
        self.sizes[name] = end
        return _StorageInfo(relative_path=name, offset=offset, length=end - offset)


def reshard_checkpoint(
    src: str | Path, out: str | Path, layout: ParallelConfig | Literal["single"], progress: bool = True
) -> Path:
    """Rewrite the checkpoint at `src` (a step_* folder, checkpoints/ folder or run directory) for `layout`.

    `layout` "single": the model's weights as one safetensors file `out` (`consolidate`; a folder `out` gets
    model.safetensors). Otherwise a checkpoint folder `out` (which must not exist) whose storage is cut for the
    ParallelConfig `layout` (see the module docstring), with the model, AdamW state, schedule and manifest extra of
    `src`; its manifest records the target layout and world size and where it came from. It loads into any layout,
    like every checkpoint. ConfigError (one line) if the layout cannot run this model; ValueError if the source
    fails its checksums. Returns the written file or folder.
    """
    path, out = resolve_checkpoint(src), Path(out)
    if layout == "single":
        return consolidate(path, out if out.suffix == ".safetensors" else out / "model.safetensors", progress=progress)
    read_sharded_manifest(path)
    verify_manifest(path)
    if out.exists():
        raise ValueError(f"{out} already exists; reshard into a new folder")
    saved = saved_config(path)
    # Gradient accumulation is no part of how state is stored; with a pipeline, parallel.microbatches replaces it.
    train = saved["train"] | {"grad_accum": 1}
    cfg = config_from_dict(saved | {"parallel": dataclasses.asdict(layout), "train": train})
    dims = ParallelDims.from_config(cfg)
    dims.check_layout(cfg)
    ranks = RankSlices(cfg)
    reader = OnceReadReader(path)
    source = reader.read_metadata()
    tmp = out.parent / f".tmp_{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = _RankFiles(tmp)
    items: dict[str, Any] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    total = sum(_nbytes(meta) for meta in source.state_dict_metadata.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="reshard", disable=not progress) as bar:
        for key, meta in sorted(source.state_dict_metadata.items()):
            if isinstance(meta, BytesStorageMetadata):
                ((first, *_),) = ranks.slices(key, torch.Size()).values()
                info = source.storage_data[MetadataIndex(key)]
                storage[MetadataIndex(key)] = files.append(first, _raw_bytes(path, info))
                items[key] = BytesStorageMetadata()
            else:
                items[key] = _write_tensor(key, meta, reader, ranks, files, storage)
            bar.update(_nbytes(meta))
    metadata = Metadata(
        state_dict_metadata=items,
        planner_data=source.planner_data,
        storage_data=storage,
        storage_meta=StorageMeta(save_id=str(uuid.uuid4())),
        version=source.version,
    )
    with open(tmp / ".metadata", "wb") as f:
        pickle.dump(metadata, f)  # DCP's index format; bigmodel reads it back with bigmodel.checkpoint.safe
    _write_manifest(path, tmp, dims)
    os.replace(tmp, out)
    return out


def _write_tensor(
    key: str,
    meta: TensorStorageMetadata,
    reader: OnceReadReader,
    ranks: RankSlices,
    files: _RankFiles,
    storage: dict[MetadataIndex, _StorageInfo],
) -> TensorStorageMetadata:
    """Read tensor `key` whole, store each target slice in its first reader's file; the new metadata entry."""
    return_freed_memory()
    whole = {key: torch.empty(meta.size, dtype=meta.properties.dtype)}
    load_dcp(whole, reader, collective=False)
    tensor = whole.pop(key)
    chunks = []
    for (offsets, sizes), readers in ranks.slices(key, meta.size).items():
        piece = tensor
        for dim, (start, length) in enumerate(zip(offsets, sizes, strict=True)):
            piece = piece.narrow(dim, start, length)
        storage[MetadataIndex(key, torch.Size(offsets))] = files.append(readers[0], piece)
        chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
        del piece
    return TensorStorageMetadata(properties=meta.properties, size=meta.size, chunks=chunks)


def _raw_bytes(path: Path, info: _StorageInfo) -> bytes:
    """A non-tensor item's stored bytes, copied without unpickling them (they are small: numbers, tuples)."""
    if info.transform_descriptors:
        raise ValueError(f"checkpoint {path} stores items with transforms {info.transform_descriptors}; not supported")
    with open(path / info.relative_path, "rb") as f:
        f.seek(info.offset)
        return f.read(info.length)


def _nbytes(meta: TensorStorageMetadata | BytesStorageMetadata) -> int:
    if isinstance(meta, TensorStorageMetadata):
        return meta.size.numel() * meta.properties.dtype.itemsize
    return 0


def _write_manifest(src: Path, folder: Path, dims: ParallelDims) -> None:
    manifest = read_manifest(src)
    manifest |= {
        "layout": dataclasses.asdict(dims),
        "world_size": dims.world_size,
        "resharded_from": {key: manifest.get(key) for key in ("layout", "world_size")} | {"path": str(src)},
        "torch": torch.__version__,
    }
    manifest.pop("files", None)
    manifest["files"] = checksums(folder)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
