"""Loading DCP checkpoints without running code they might carry.

torch.distributed.checkpoint (torch 2.13) unpickles two things on load with Python's full pickle: the `.metadata`
index (`FileSystemReader.read_metadata`, `pickle.load`) and every non-tensor item of the state dict
(`DefaultLoadPlanner.load_bytes`, `torch.load(weights_only=False)`; ours are the optimizer's hyper-parameters and
the LR schedule). A crafted checkpoint could run any code there, and a checksum in the manifest does not help: whoever
crafts the shards writes the manifest too. DCP reads tensor records with `torch.load(weights_only=True)`; bigmodel
stores them as raw bytes, which nothing unpickles.

`SafeReader` unpickles the index with an allow-list of DCP's own metadata classes and reads tensors as the raw
bytes bigmodel stores them in (`bigmodel.checkpoint.sharded.RawRecordWriter`: nothing to unpickle), and
`SafeLoadPlanner` reads non-tensor items (bigmodel stores plain numbers, strings, tuples, lists, dicts and None as a
pickle that names no class: `records.plain_record`) with an unpickler that refuses every global, or, where the item is a
torch.save record, with `torch.load(weights_only=True)`. Either refuses anything else with `UnsafeCheckpointError`,
a one-line ValueError naming the file, before building the object. Every bigmodel load of a DCP checkpoint goes
through `load_dcp` or these two classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index  # what FileSystemReader.read_data uses
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_local_load_plan
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.tensor import DTensor

from bigmodel.checkpoint.records import UnsafeCheckpointError, read_plain_record, tensor_bytes

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# Everything torch 2.13's DCP writes into `.metadata`; each is a plain record or a lookup by name, so building one
# from attacker-chosen arguments runs no attacker-chosen code.
_METADATA_GLOBALS = frozenset(
    {
        (_METADATA_MODULE, "Metadata"),
        (_METADATA_MODULE, "MetadataIndex"),
        (_METADATA_MODULE, "StorageMeta"),
        (_METADATA_MODULE, "TensorProperties"),
        (_METADATA_MODULE, "TensorStorageMetadata"),
        (_METADATA_MODULE, "ChunkStorageMetadata"),
        (_METADATA_MODULE, "BytesStorageMetadata"),
        (_METADATA_MODULE, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP's metadata records and torch dtypes; refuses every other global before importing it."""

    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.source} holds a pickled {module}.{name}, which is not DCP checkpoint metadata; refusing to "
            "load it (the checkpoint is crafted or not a DCP checkpoint)"
        )


def read_dcp_metadata(file: Path) -> Metadata:
    """DCP's index at `file` (a `.metadata`), unpickled with the allow-list; UnsafeCheckpointError otherwise."""
    with open(file, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, file).load()
        except UnsafeCheckpointError:
            raise
        except Exception as err:  # truncated or garbage: any unpickling error
            raise ValueError(f"{file} is not a readable DCP index ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{file} holds a {type(metadata).__name__}, not DCP checkpoint metadata")
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader for bigmodel's sharded format: the index is unpickled by `read_dcp_metadata`, and each
    tensor record is raw bytes (RawRecordWriter) read straight into the destination tensor where it is the whole
    stored chunk, contiguous, on the CPU and of the stored dtype (else into a buffer that is narrowed and copied)."""

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._index = metadata.state_dict_metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in per_file.items():
            with open(Path(self.path) / name, "rb") as f:
                for item in sorted(items, key=lambda i: self.storage_data[i.storage_index].offset):
                    info: _StorageInfo = self.storage_data[item.storage_index]
                    if info.transform_descriptors:
                        raise ValueError(f"checkpoint {self.path}: {name} has transformed records; not supported")
                    f.seek(info.offset)
                    if item.type == LoadItemType.BYTE_IO:
                        planner.load_bytes(item, io.BytesIO(f.read(info.length)))
                    else:
                        self._read_tensor(f, item, info, planner)
        done: torch.futures.Future[None] = torch.futures.Future()
        done.set_result(None)
        return done

    def _read_tensor(self, f: IO[bytes], item: ReadItem, info: _StorageInfo, planner: LoadPlanner) -> None:
        sizes, dtype = self._stored_chunk(item.storage_index)
        if info.length != sizes.numel() * dtype.itemsize:
            raise ValueError(
                f"checkpoint {self.path}: {info.relative_path} stores {item.storage_index.fqn} in {info.length} bytes, "
                f"not the {sizes.numel() * dtype.itemsize} of a raw {dtype} {list(sizes)} (corrupt, or not written "
                "by RawRecordWriter)"
            )
        target = planner.resolve_tensor(item).detach()
        if list(target.shape) != list(item.lengths):
            raise ValueError(f"checkpoint {self.path}: {item.storage_index.fqn} is {list(target.shape)} in the model")
        whole = not any(item.storage_offsets) and list(item.lengths) == list(sizes)
        if whole and target.dtype == dtype and target.is_contiguous() and target.device.type == "cpu":
            self._read_into(f, target, item.storage_index)
        else:
            stored = torch.empty(sizes, dtype=dtype)
            self._read_into(f, stored, item.storage_index)
            target.copy_(narrow_tensor_by_index(stored, item.storage_offsets, item.lengths))
        planner.commit_tensor(item, target)

    def _stored_chunk(self, index: MetadataIndex) -> tuple[torch.Size, torch.dtype]:
        """Shape and dtype of the stored chunk `index` names, from the index."""
        meta = self._index.get(index.fqn)
        if isinstance(meta, TensorStorageMetadata):
            for chunk in meta.chunks:
                if chunk.offsets == index.offset:
                    return chunk.sizes, meta.properties.dtype
        raise ValueError(f"checkpoint {self.path}: the index lists no stored chunk {index.fqn} at {index.offset}")

    def _read_into(self, f: IO[bytes], tensor: torch.Tensor, index: MetadataIndex) -> None:
        buffer = tensor_bytes(tensor)  # contiguous on the CPU: a view of its memory
        if f.readinto(buffer) != len(buffer):
            raise ValueError(f"checkpoint {self.path}: the record of {index.fqn} is cut short (truncated file)")

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        metadata = read_dcp_metadata(Path(self._get_metadata_path(rank)))
        # What FileSystemReader.read_metadata adds after unpickling (torch 2.13).
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class OnceReadReader(SafeReader):
    """A SafeReader that unpickles DCP's index once, on construction: dcp.load reads it again on every call, which
    dominates loading a checkpoint tensor by tensor."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._metadata = super().read_metadata()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor items with read_plain_record, and reads a tensor whose local piece is
    exactly one stored chunk (every tensor of a load into the layout that saved it) as that chunk, without DCP's
    search of all stored chunks for overlaps (a quarter of loading a small checkpoint)."""

    def __init__(self) -> None:
        super().__init__(flatten_sharded_tensors=False)  # bigmodel holds no ShardedTensor: no need to look for one
        self._read_bytes: dict[bytes, bytes] = {}

    def create_local_plan(self) -> LoadPlan:
        index = self.metadata.state_dict_metadata
        if self.flatten_state_dict and index.keys() - self.state_dict.keys():
            return super().create_local_plan()  # a partial load, or a checkpoint of torch <= 2.3: DCP's own rules
        direct, rest = [], {}
        for fqn, obj in self.state_dict.items():
            item = _whole_chunk_read(fqn, index.get(fqn), obj)
            if item is None:
                rest[fqn] = obj
            else:
                direct.append(item)
        plan = create_default_local_load_plan(rest, self.metadata, not self.allow_partial_load)
        return dataclasses.replace(plan, items=[*direct, *plan.items])

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        record = value.getvalue()
        if record in self._read_bytes:  # the parameters of one optimizer group share one hyper-parameter record
            obj: Any = self._read_bytes[record]
        else:
            obj = read_plain_record(value, fqn)
            if isinstance(obj, bytes):  # immutable: safe to hand to several items
                self._read_bytes[record] = obj
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner uses

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _whole_chunk_read(fqn: str, stored: Any, obj: Any) -> ReadItem | None:
    """The read of `obj` where its local piece is exactly one stored chunk of `fqn`, else None (DCP plans it)."""
    if not isinstance(stored, TensorStorageMetadata) or not isinstance(obj, torch.Tensor) or stored.size != obj.size():
        return None
    if isinstance(obj, DTensor):
        if obj.device_mesh.get_coordinate() is None:
            return None
        local = obj.__create_chunk_list__()
        if len(local) != 1:
            return None
        offsets, sizes = local[0].offsets, local[0].sizes
    else:
        offsets, sizes = torch.Size([0] * obj.dim()), obj.size()
    for position, chunk in enumerate(stored.chunks):
        if chunk.offsets == offsets and chunk.sizes == sizes:
            zeros = torch.Size([0] * len(sizes))
            return ReadItem(
                type=LoadItemType.TENSOR,
                dest_index=MetadataIndex(fqn, offsets, 0),
                dest_offsets=zeros,
                storage_index=MetadataIndex(fqn, offsets, position),
                storage_offsets=zeros,
                lengths=sizes,
            )
    return None


SINGLE_PROCESS_NOTICE = "torch.distributed is .*assuming the intent is to .* in a single process"
"""torch's warning that DCP, without a process group, assumes a single process: torch 2.13 gives it even where the
caller passes no_dist=True, and a one-process save or resume is meant, not something the user must hear about."""


def silence_single_process_notice() -> None:
    """Ignore SINGLE_PROCESS_NOTICE process-wide (done once at import). A scoped filter is not enough: an async save
    gives the warning from DCP's writer thread, after the block that started it has ended."""
    warnings.filterwarnings("ignore", SINGLE_PROCESS_NOTICE)


silence_single_process_notice()


@contextlib.contextmanager
def single_process() -> Iterator[bool]:
    """Whether DCP runs without a process group here (`no_dist`), with SINGLE_PROCESS_NOTICE silenced for the block
    also where the caller's warning filters (set after import) would show it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", SINGLE_PROCESS_NOTICE)
        yield not dist.is_initialized()


def load_dcp(state: dict[str, Any], path: str | Path | SafeReader, collective: bool = True) -> None:
    """`dcp.load(state, ...)` from the checkpoint folder `path` (or a SafeReader of it), without unpickling code.

    collective: every rank of the default process group calls this together (as training does); False for a
    process that reads on its own (the offline tools), even where a process group exists.
    """
    # A refused index raises here, in one line (inside dcp.load the error is folded into an AssertionError).
    reader = path if isinstance(path, SafeReader) else OnceReadReader(path)
    reader.read_metadata()
    try:
        with single_process() as alone:
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=alone or not collective)
    except CheckpointException as err:
        # DCP wraps what a step raised on each rank; a refusal (or another bad-input error) is re-raised as itself.
        for exception, _ in err.failures.values():
            if isinstance(exception, ValueError):
                raise exception from None
        raise
