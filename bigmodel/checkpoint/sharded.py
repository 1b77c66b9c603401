"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards of the model and the
optimizer state, and a checkpoint loads into any parallel layout (DCP reshards on load).

The saved state does not depend on the layout: parameters under the unsplit model's names (tensors, or DTensors
whose global shape is the parameter's), AdamW's state per parameter name in the flattened form of
`torch.distributed.checkpoint.state_dict` (`state.<name>.exp_avg`, ...; ZeroOptimizer converts its chunks to it)
with each parameter's hyper-parameters in one item (`param_groups.<name>`: see pack_hyperparameters), and the LR
schedule. Layout of one checkpoint folder:
  __<rank>_0.distcp     one file per saving rank (RawRecordWriter): each tensor shard as its raw bytes, each other
                        item (hyper-parameters, schedule) as a pickle of plain data (`plain_record`; a torch.save of
                        it where it holds anything else)
  .metadata             DCP's index: every item's dtype, shape, chunks and place in the files
  manifest.json         format, byte order, step, the caller's JSON `extra`, the layout saved from, torch version, a
                        checksum of every file ("xxh3_128:<hex>"; a bare hex digest is sha256, as format 2 wrote them)
A checkpoint is written to a temporary folder next to `path` and renamed to `path` once complete.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import hashlib
import io
import json
import os
import pickle
import queue
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor import DTensor

if TYPE_CHECKING:
    from bigmodel.engines.native import NativeEngine

MANIFEST_FILE = "manifest.json"
# 2: hyper-parameters in one item per parameter (pack_hyperparameters); 3: tensors as raw bytes (RawRecordWriter)
FORMAT = "bigmodel-sharded-3"
CHECKSUM = "xxh3_128"
"""The checksum new manifests record; verify_manifest also reads sha256 (the digests of formats 1 and 2)."""
_HYPER_PREFIX = "param_groups."


def engine_state_dict(engine: NativeEngine) -> dict[str, Any]:
    """`{"model": ..., "optim": ..., "scheduler": ...}` of `engine`, keyed by the unsplit model's names.

    Tensors are this rank's shards (DTensors under tensor parallelism and FSDP) or whole tensors; they share storage
    with the model and the optimizer where they can, so `dcp.load` into this dict loads in place. Every rank calls
    it (a collective for ZeroOptimizer stages 1 and 2).

    The form is that of torch's `get_state_dict(..., flatten_optimizer_state_dict=True)`, built from the modules'
    own `state_dict()` and the optimizer's state directly: bigmodel's models keep their parameter names in every
    layout (no wrapper adds a prefix: FSDP2 and compile work in place), which torch's helpers otherwise establish
    name by name, about a third of loading a small checkpoint (docs/benchmarks.md, row g).
    """
    model: dict[str, Any] = {}
    for module in engine.model_parts():
        model.update(module.state_dict())
    if engine.zero is not None:
        optim = pack_hyperparameters(engine.zero.fqn_state_dict())
    else:
        optim = parts_optimizer_state(engine, packed=True)
    return {"model": model, "optim": optim, "scheduler": engine.scheduler.state_dict()}


IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")
"""Optimizer settings that choose how the update runs, not what it computes. Each layout picks its own (ZeRO-3 runs
AdamW foreach over its shards, a pipeline stage per tensor), so a checkpoint's never replace the live optimizer's."""


def load_engine_state_dict(engine: NativeEngine, state: dict[str, Any]) -> None:
    """Put `state` (engine_state_dict's form, filled by `dcp.load`) into the engine's model, optimizer and schedule.

    Model tensors that `dcp.load` filled in place (those of this engine's engine_state_dict) are already the
    model's; any other is copied in by the module's `load_state_dict`.
    """
    optim = unpack_hyperparameters(state["optim"])
    implementation = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in engine.optimizer.param_groups]
    for module in engine.model_parts():
        live = module.state_dict()
        given = {name: state["model"][name] for name in live}
        if not all(_same_memory(given[name], tensor) for name, tensor in live.items()):
            module.load_state_dict(given)
    if engine.zero is not None:
        engine.zero.load_fqn_state_dict(optim)
    else:
        load_parts_optimizer_state(engine, optim)
    for group, own in zip(engine.optimizer.param_groups, implementation, strict=True):
        group.update(own)
    engine.scheduler.load_state_dict(state["scheduler"])


def _same_memory(a: Any, b: torch.Tensor) -> bool:
    """Whether `a` is a tensor viewing exactly `b`'s elements (DTensors: their local tensors)."""
    if not isinstance(a, torch.Tensor) or type(a) is not type(b):
        return False
    if isinstance(a, DTensor):
        a, b = a.to_local(), b.to_local()
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def pack_hyperparameters(flat: dict[str, Any]) -> dict[str, Any]:
    """The flattened optimizer state with each parameter's hyper-parameters (`param_groups.<name>.<key>`: lr, betas,
    eps, ... about 12 per parameter) joined into one item `param_groups.<name>`: the `plain_record` of a tuple of
    (key, value) pairs (the tuple itself where a value is not plain data).

    DCP stores every item as a separate record (and an entry in the index); the hyper-parameters were three quarters
    of a checkpoint's items and up to a third of its save and half of its load time (docs/benchmarks.md, row g). As
    bytes, an item is one opaque value to DCP's planners, which otherwise walk every value of a tuple on load (~14k
    visits, ~20 ms at 15M parameters). Per parameter name, like the rest of the state, so the form does not depend
    on the layout.
    """
    packed: dict[str, Any] = {}
    hyper: dict[str, list[tuple[str, Any]]] = {}
    for key, value in flat.items():
        if key.startswith(_HYPER_PREFIX):
            name, _, field = key.removeprefix(_HYPER_PREFIX).rpartition(".")
            hyper.setdefault(name, []).append((field, value))
        else:
            packed[key] = value
    records: dict[Any, Any] = {}  # parameters of one group share their hyper-parameters: one record per group
    for name, pairs in hyper.items():
        value = tuple(pairs)
        try:
            hash(value)
        except TypeError:  # a value that is a list: packed on its own
            packed[_HYPER_PREFIX + name] = _packed(value)
            continue
        if value not in records:
            records[value] = _packed(value)
        packed[_HYPER_PREFIX + name] = records[value]
    return packed


def _packed(pairs: tuple[tuple[str, Any], ...]) -> Any:
    record = plain_record(pairs)
    return pairs if record is None else record


def unpack_hyperparameters(packed: dict[str, Any]) -> dict[str, Any]:
    """pack_hyperparameters undone: torch's flattened form, which the optimizers' state-dict loaders take. A record
    that names any class or function is refused (UnsafeCheckpointError) without being run."""
    from bigmodel.checkpoint.safe import read_plain_record

    flat: dict[str, Any] = {}
    records: dict[bytes, Any] = {}  # a group's parameters share one record: read it once
    for key, value in packed.items():
        if key.startswith(_HYPER_PREFIX):
            if isinstance(value, bytes):
                if value not in records:
                    records[value] = read_plain_record(io.BytesIO(value), key)
                value = records[value]
            flat.update({f"{key}.{field}": v for field, v in value})
        else:
            flat[key] = value
    return flat


def _named_params(engine: NativeEngine) -> dict[int, str]:
    return {id(p): name for part in engine.model_parts() for name, p in part.named_parameters()}


def parts_optimizer_state(engine: NativeEngine, packed: bool = False) -> dict[str, Any]:
    """The state of an AdamW over the engine's model parts (every layout but ZeroOptimizer's stages 1 and 2) in the
    flattened form of `get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)`, which torch's helpers
    build for one module only. The moments are the optimizer's own tensors (DTensors where the parameters are);
    before the first step they are zeros and step 0, so the form never depends on when it is taken.

    packed: the hyper-parameters as `pack_hyperparameters` would pack them, made once per group rather than split
    into ~12 items per parameter and joined again (~4k items at 15M parameters, 5-10 ms of every save and load)."""
    names = _named_params(engine)
    flat: dict[str, Any] = {}
    for group in engine.optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        record = _packed(tuple(hyper.items())) if packed else None
        for param in group["params"]:
            name, state = names[id(param)], engine.optimizer.state.get(param, {})
            flat[f"state.{name}.step"] = state.get("step", torch.tensor(0.0)).detach().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                flat[f"state.{name}.{key}"] = state[key] if key in state else torch.zeros_like(param)
            if packed:
                flat[_HYPER_PREFIX + name] = record
            else:
                flat.update({f"{_HYPER_PREFIX}{name}.{k}": v for k, v in hyper.items()})
    return flat


@torch.no_grad()
def load_parts_optimizer_state(engine: NativeEngine, flat: dict[str, Any]) -> None:
    """Restore parts_optimizer_state's form (saved in any layout) into the engine's AdamW. The moments become the
    optimizer's state as they are (`dcp.load` filled those of this engine's own parts_optimizer_state in place)."""
    names = _named_params(engine)
    for group in engine.optimizer.param_groups:
        on_device = group.get("capturable") or group.get("fused")  # as torch's Optimizer.load_state_dict places it
        for param in group["params"]:
            name = names[id(param)]
            step = torch.as_tensor(flat[f"state.{name}.step"]).detach().clone().float()
            engine.optimizer.state[param] = {
                "step": step.to(param.device) if on_device else step,
                **{key: flat[f"state.{name}.{key}"] for key in ("exp_avg", "exp_avg_sq")},
            }
        if group["params"]:  # hyper-parameters are per group: its first parameter's saved values stand for all
            first = names[id(group["params"][0])]
            for key in group.keys() - {"params"}:
                group[key] = flat[f"param_groups.{first}.{key}"]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of `tensor`'s elements in C order and this machine's byte order: a (writable) view of its memory
    where it is contiguous on the CPU, else of a contiguous CPU copy. What a raw record stores (RawRecordWriter)."""
    dense = tensor.detach().cpu().contiguous()
    # as_strided, not view(-1): a contiguous tensor may carry any stride on a dimension of size 1, which view keeps.
    flat = dense.as_strided((dense.numel(),), (1,))
    return memoryview(flat.view(torch.uint8).numpy())


_PLAIN_TYPES = (bool, int, float, str, bytes, type(None))


def _is_plain(value: Any) -> bool:
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    return type(value) in _PLAIN_TYPES  # exact types: a subclass pickles as a reference to its class


def plain_record(value: Any) -> bytes | None:
    """`value` pickled without references to any class or function (numbers, strings, bytes, None and tuples, lists,
    sets and dicts of them: hyper-parameters, the schedule's state), or None where it holds anything else.

    Such a record loads with an unpickler that refuses every global (bigmodel.checkpoint.safe), in a few microseconds
    where torch.load(weights_only=True) of the same value takes ~200: the optimizer's hyper-parameters are one item
    per parameter (pack_hyperparameters), a quarter of a small checkpoint's load time as torch.save records
    (docs/benchmarks.md, row g). A record starts with pickle's PROTO opcode; a torch.save record (a zip) with "PK".
    """
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL) if _is_plain(value) else None


@contextlib.contextmanager
def gc_paused() -> Any:
    """Python's cyclic garbage collector off for the block. Building a checkpoint's state dict and index allocates
    thousands of small objects, which trigger full collections over a training process's ~300k objects (0.1-0.15 s
    each, measured at 15M parameters); everything checkpointing allocates is freed by reference counting."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class RawRecordWriter(FileSystemWriter):
    """DCP's FileSystemWriter with each tensor stored as its raw bytes (`tensor_bytes`) instead of a `torch.save`.

    DCP's index already holds every stored chunk's dtype and shape, so a record needs no header; torch.save's zip
    framing, pickling and CRC32 cost ~60% over writing the bytes at a typical 100 kB tensor (docs/benchmarks.md, row
    g), and loading a raw record unpickles nothing (bigmodel.checkpoint.safe.SafeReader reads them). Non-tensor items
    (hyper-parameters, the schedule) are `plain_record`s where they are plain data, else DCP's torch.save. One file
    per rank, `__<rank>_0.distcp`, fsynced before the index is written; the thread_count and serialization_format
    options do not apply.

    Each rank checksums its file as it writes it and leaves the digest beside it (`<file>.digest`), which the main
    rank takes into the manifest (`_checksums`) instead of reading every rank's bytes back.
    """

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future[list[WriteResult]]:
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results = []
        digest = _HASHES[CHECKSUM]()
        with open(Path(self.path) / name, "wb") as f:
            writeback = Writeback(f)
            for item in sorted(plan.items, key=_stored_bytes):
                offset = f.tell()
                record = _record(item, planner)
                f.write(record)
                digest.update(record)
                info = _StorageInfo(relative_path=name, offset=offset, length=f.tell() - offset)
                results.append(WriteResult(index=item.index, size_in_bytes=info.length, storage_data=info))
                writeback.wrote()
            f.flush()
            os.fsync(f.fileno())
        (Path(self.path) / f"{name}{DIGEST_SUFFIX}").write_text(f"{CHECKSUM}:{digest.hexdigest()}", encoding="utf-8")
        written: torch.futures.Future[list[WriteResult]] = torch.futures.Future()
        written.set_result(results)
        return written


def _stored_bytes(item: WriteItem) -> int:
    """The order of RawRecordWriter's records: non-tensor items first, then tensors from the smallest. A load reads
    them in file order while the disk still delivers the rest (`_prefetching`), so its many small records (at 15M
    parameters ~640 of 1,670 hold 2% of the bytes: step counters, biases, norms) cost Python time while the disk
    reads the large ones, not after it is done (where they were, 8-10 ms after the prefetch's end)."""
    if item.tensor_data is None:
        return 0
    return item.tensor_data.chunk.sizes.numel() * item.tensor_data.properties.dtype.itemsize


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) from the C library, or None where there is none."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return call


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writing the range's dirty pages back; do not wait


class Writeback:
    """Has the kernel start writing a file's pages to the disk every `every` bytes written, without waiting, so the
    disk writes while the writer prepares the next records and the closing fsync waits for the last few MiB only
    (measured: 181 MB in 135 kB records, 0.186 -> 0.171 s per write and fsync). Nothing where the C library lacks
    sync_file_range (it is Linux's)."""

    def __init__(self, f: Any, every: int = 8 << 20) -> None:
        self.f, self.every, self.started = f, every, 0

    def wrote(self) -> None:
        end = self.f.tell()
        if _SYNC_FILE_RANGE is None or end - self.started < self.every:
            return
        self.f.flush()
        _SYNC_FILE_RANGE(self.f.fileno(), self.started, end - self.started, _SYNC_FILE_RANGE_WRITE)
        self.started = end


def _record(item: WriteItem, planner: SavePlanner) -> bytes | memoryview:
    """The bytes RawRecordWriter stores for `item`: a tensor's raw bytes, a plain_record, or DCP's torch.save."""
    if item.type == WriteItemType.BYTE_IO and isinstance(planner, DefaultSavePlanner):
        record = plain_record(planner.lookup_object(item.index))
        if record is not None:
            return record
    data = planner.resolve_data(item)
    return data.getbuffer() if item.type == WriteItemType.BYTE_IO else tensor_bytes(data)


class PendingSave:
    """A checkpoint being written. `wait()` returns its folder once complete; `done()` says whether it is.

    Rank 0 finishes it (checksums, manifest, rename to the final folder, then `on_complete(path)`) once DCP has
    written every rank's shards: in DCP's background thread for an async save, before save_sharded returns
    otherwise. Other ranks only wait for their own shards. Neither step runs a collective on the training group.
    """

    def __init__(self, tmp: Path, path: Path, manifest: dict[str, Any], on_complete: Callable[[Path], None] | None):
        self.tmp, self.path, self.manifest, self.on_complete = tmp, path, manifest, on_complete
        self.future: Future | None = None
        self._finished = threading.Event()
        self._error: BaseException | None = None

    def start_background(self, future: Future) -> None:
        self.future = future
        future.add_done_callback(lambda _: self._finish())

    def _finish(self) -> None:
        try:
            if self.future is not None:
                self.future.result()  # re-raises a failed write
            if _is_main():
                self.manifest["files"] = _checksums(self.tmp)
                (self.tmp / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2), encoding="utf-8")
                purge(self.path)  # the checkpoint this one replaces, if any
                os.replace(self.tmp, self.path)
                if self.on_complete is not None:
                    self.on_complete(self.path)
        except BaseException as err:  # handed to the thread that waits
            self._error = err
        finally:
            self._finished.set()

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self) -> Path:
        self._finished.wait()
        if self._error is not None:
            raise RuntimeError(f"saving checkpoint {self.path} failed: {self._error}") from self._error
        return self.path


def _save_planner() -> DefaultSavePlanner:
    """DCP's planner, reusing the previous save's plan while the state's structure is unchanged (every periodic save
    of a run after the first; ~20 ms at 15M parameters) and not looking for ShardedTensors, which bigmodel never
    holds."""
    return DefaultSavePlanner(flatten_sharded_tensors=False, enable_plan_caching=True)


def save_sharded(
    path: str | Path, engine: NativeEngine, extra: dict[str, Any], on_complete: Callable[[Path], None] | None = None
) -> Path:
    """Write `engine`'s state to the folder `path` (replacing one there) and return it. Every rank calls it.

    `extra` (the step, data position, ...) must be JSON; it goes into manifest.json and `load_sharded` returns it.
    The shards are written to `.tmp_<name>` beside `path`, which rank 0 renames to `path` after every rank is done,
    then calls `on_complete(path)`.
    """
    pending = _start_save(Path(path), engine, extra, on_complete)
    with gc_paused():
        dcp.save(engine_state_dict(engine), storage_writer=RawRecordWriter(pending.tmp), planner=_save_planner())
    if dist.is_initialized():
        dist.barrier()
    pending._finish()
    if dist.is_initialized():
        dist.barrier()
    return pending.wait()


def save_sharded_async(
    path: str | Path,
    engine: NativeEngine,
    extra: dict[str, Any],
    group: dist.ProcessGroup | None,
    on_complete: Callable[[Path], None] | None = None,
) -> PendingSave:
    """save_sharded in the background: the state is copied to host memory, then written by a thread while the
    caller trains on. `group` is a gloo process group used only for checkpoints (None in a single process), so
    the writer's collectives never interleave with training's. Call `.wait()` before the next save and before
    the process exits."""
    pending = _start_save(Path(path), engine, extra, on_complete)
    with gc_paused():  # the state dict and its copy to host memory; the writing thread runs with the collector on
        state, writer = engine_state_dict(engine), RawRecordWriter(pending.tmp)
        response = dcp.async_save(state, storage_writer=writer, planner=_save_planner(), process_group=group)
    pending.start_background(getattr(response, "upload_completion", response))  # a Future, or one inside a response
    return pending


PURGE_PREFIX = ".purge_"
"""A folder being deleted in the background: `.purge_<name>.<random>` beside where it was."""
_purges: queue.Queue[Path] = queue.Queue()
_purger_lock = threading.Lock()
_purger: threading.Thread | None = None
_purging: set[Path] = set()
"""Folders handed to the deleting thread and not yet deleted (guarded by _purger_lock)."""


def purge(folder: Path) -> None:
    """Delete `folder` (if it exists) without waiting: it is renamed at once to `.purge_<name>.<random>` beside
    itself, so it stops being a checkpoint, and removed by a background thread. Deleting a large checkpoint takes
    seconds to minutes on a parallel filesystem, which every rank would wait for at the next barrier. The process
    waits for pending deletions at exit (and in wait_for_purges); what a killed process left is deleted by the next
    save in that folder (purge_leftovers)."""
    folder = Path(folder)
    if not folder.exists():
        return
    trash = folder.parent / f"{PURGE_PREFIX}{folder.name}.{uuid.uuid4().hex[:8]}"
    os.replace(folder, trash)
    _queue_deletion(trash)


def purge_leftovers(parent: Path) -> None:
    """Delete the `.purge_*` folders a killed process left in `parent` (in the background, like purge). Those this
    process is deleting already are left to that deletion: renaming a folder while it is being deleted made both
    fail (a save right after another, while the replaced checkpoint was still being deleted)."""
    for leftover in Path(parent).glob(f"{PURGE_PREFIX}*"):
        _queue_deletion(leftover)


def _queue_deletion(trash: Path) -> None:
    global _purger
    with _purger_lock:
        if trash in _purging:
            return
        _purging.add(trash)
        if _purger is None:
            _purger = threading.Thread(target=_delete_purged, name="bigmodel-purge", daemon=True)
            _purger.start()
            atexit.register(wait_for_purges)
    _purges.put(trash)


def wait_for_purges() -> None:
    """Return once every folder handed to purge so far is deleted."""
    _purges.join()


def _delete_purged() -> None:
    while True:
        trash = _purges.get()
        try:
            shutil.rmtree(trash, ignore_errors=True)
        finally:
            with _purger_lock:
                _purging.discard(trash)
            _purges.task_done()


def _start_save(
    path: Path, engine: NativeEngine, extra: dict[str, Any], on_complete: Callable[[Path], None] | None
) -> PendingSave:
    """Check `extra`, prepare the manifest and an empty temporary folder (all ranks wait for it)."""
    manifest = {"format": FORMAT, "byteorder": sys.byteorder, "step": extra.get("step"), "extra": extra}
    try:
        json.dumps(manifest)
    except TypeError as err:
        raise TypeError(f"save_sharded: extra must be JSON ({err}); keep tensors in the engine state") from None
    manifest |= {"layout": asdict(engine.ctx.dims), "world_size": engine.ctx.env.world_size, "torch": torch.__version__}
    tmp = path.parent / f".tmp_{path.name}"
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        purge_leftovers(path.parent)
    if dist.is_initialized():
        dist.barrier()
    return PendingSave(tmp, path, manifest, on_complete)


def load_sharded(path: str | Path, engine: NativeEngine, checked: Collection[str] = ()) -> dict[str, Any]:
    """Load the checkpoint at `path` into `engine`, whatever layout it was saved from, and return its `extra`.

    Every rank calls it. It checks no checksum (verify_manifest does) except those of `checked`: this rank's own
    shard file (`checked_while_loading`), hashed as the prefetch reads it from the disk, so a resume reads it once
    instead of once to check and once to load. A mismatch raises verify_manifest's one-line ValueError on every rank,
    after the engine has taken the file's contents: the caller must not go on with it. A pickled object that is not
    plain checkpoint data raises UnsafeCheckpointError (a ValueError) without being run.
    """
    from bigmodel.checkpoint.safe import load_dcp

    path = Path(path)
    manifest = read_sharded_manifest(path)
    own = _own_files(path, manifest)
    hashed = {path / name: _recorded(path, manifest["files"], name) for name in checked}
    if not hashed.keys() <= set(own):
        raise ValueError(f"checkpoint {path}: {sorted(checked)} are not all files this rank loads whole")
    with _prefetching(own, hashed) as prefetch:
        try:
            with gc_paused():
                state = engine_state_dict(engine)
                load_dcp(state, path)  # never unpickles code from the checkpoint (bigmodel.checkpoint.safe)
                load_engine_state_dict(engine, state)
        except Exception as err:  # a corrupt file may fail to parse before its checksum is known: name the cause
            if problem := prefetch.mismatch():
                raise ValueError(problem) from err
            raise
        problem = prefetch.mismatch()
    if hashed and dist.is_initialized():  # every rank stops together, with the first failing rank's line
        problems: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        raise ValueError(problem)
    return manifest["extra"]


def checked_while_loading(manifest: dict[str, Any], rank: int, world_size: int) -> list[str]:
    """The files of `manifest` whose checksums rank `rank` of `world_size` may leave to `load_sharded(checked=...)`:
    its own shard file when the checkpoint was saved by as many ranks (a resume), which the load reads whole."""
    own = shard_file(rank)
    return [own] if manifest.get("world_size") == world_size and own in manifest["files"] else []


def _own_files(path: Path, manifest: dict[str, Any]) -> list[Path]:
    """The shard files this rank will read: its own where the checkpoint was saved by as many ranks (a resume), else
    none known before planning (a reshard, which reads parts of several)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return [path / name for name in checked_while_loading(manifest, rank, world) if (path / name).is_file()]


def shard_file(rank: int) -> str:
    """The name of the shard file rank `rank` writes (RawRecordWriter, under DCP's `__<rank>_` prefix)."""
    return f"__{rank}_0{DEFAULT_SUFFIX}"


class _Prefetch:
    """The reading thread of `_prefetching` and the checksums it computes."""

    def __init__(self, files: list[Path], hashed: dict[Path, tuple[str, str]]) -> None:
        self.hashed = hashed
        self.digests: dict[Path, str] = {}
        self.thread = threading.Thread(target=self._read, args=(files,), name="bigmodel-prefetch", daemon=True)

    def _read(self, files: list[Path]) -> None:
        scratch = memoryview(bytearray(16 << 20))
        for file in files:
            digest = _HASHES[self.hashed[file][0]]() if file in self.hashed else None
            with open(file, "rb", buffering=0) as f:
                while size := f.readinto(scratch):
                    if digest is not None:
                        digest.update(scratch[:size])  # xxhash and hashlib release the GIL for large buffers
            if digest is not None:
                self.digests[file] = digest.hexdigest()

    def mismatch(self) -> str | None:
        """verify_manifest's line for the first hashed file that does not match its checksum, once read; else None."""
        if not self.hashed:
            return None
        self.thread.join()
        for file, (algorithm, recorded) in self.hashed.items():
            if self.digests.get(file) != recorded:
                return _mismatch_line(file.parent, file.name, algorithm)
        return None


@contextlib.contextmanager
def _prefetching(files: list[Path], hashed: dict[Path, tuple[str, str]] | None = None) -> Any:
    """Read `files` into the page cache on a background thread while the block builds the state dict and DCP plans
    the load (~40 ms at 15M parameters), so the disk is busy from the start; the reads that follow copy from memory.
    Reading, not posix_fadvise(WILLNEED), which measured no faster than nothing. Skipped where the files would take
    more than a quarter of the memory free now (their pages would be evicted again before they are read), unless a
    file is to be hashed: `hashed` maps files to (algorithm, recorded digest), computed as they are read (yields a
    `_Prefetch`; its `mismatch()` waits for the reading to end).

    For the block, the interpreter hands the GIL between threads every 0.5 ms instead of 5: the reading thread needs
    it between two 16 MiB reads, and waited up to 5 ms each time while this thread planned, leaving the disk idle
    (15M parameters, 181 MB from the disk, each load right after a raw read of as many bytes: 0.128-0.138 s a load
    with the 5 ms interval, 0.119-0.120 s with 0.5 ms; the raw read 0.096 s; without prefetching ~0.145 s)."""
    hashed = hashed or {}
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no such sysconf name here
        free = 0
    if not hashed and (not files or sum(file.stat().st_size for file in files) > free // 4):
        yield _Prefetch([], {})
        return
    prefetch = _Prefetch(files, hashed)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 0.0005))
    try:
        prefetch.thread.start()
        yield prefetch
    finally:
        sys.setswitchinterval(interval)


def read_sharded_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the checkpoint at `path`; ValueError (one line) if it is not in this module's format."""
    manifest = read_manifest(path)
    if str(manifest.get("format")).startswith("bigmodel-sharded-") and manifest["format"] != FORMAT:
        raise ValueError(
            f"checkpoint {path} has format {manifest['format']}, which stores tensors as torch.save records; this "
            f"bigmodel reads {FORMAT} (raw records) only: resume it with the bigmodel release that wrote it and save "
            "again"
        )
    if manifest.get("format") == FORMAT and manifest.get("byteorder") != sys.byteorder:
        raise ValueError(
            f"checkpoint {path} stores raw {manifest.get('byteorder')}-endian tensors; this machine is {sys.byteorder}-"
            "endian: load it on a machine like the one that saved it"
        )
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint {path} has format {manifest.get('format')}, not {FORMAT}; a deepspeed-engine checkpoint "
            f"resumes with engine=deepspeed, or converts with `bigmodel ckpt from-deepspeed {path} OUT`"
        )
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest.json of the checkpoint folder `path`."""
    return json.loads((Path(path) / MANIFEST_FILE).read_text(encoding="utf-8"))


def verify_manifest(
    path: str | Path, files: Collection[str] | None = None, unlisted: bool | None = None, present: Collection[str] = ()
) -> None:
    """Raise ValueError naming the first file of the checkpoint at `path` that is missing, changed or unlisted.

    `files`: check only these of the manifest's files (a rank's share: `verify_shares`); `unlisted`: also look for
    files the manifest does not list (default: when checking every file); `present`: files only to be found listed and
    present here, their checksums left to the load that reads them (`checked_while_loading`).
    Digests are "<algorithm>:<hex>" (CHECKSUM) or, as formats 1 and 2 wrote them, a bare sha256 hex digest."""
    path = Path(path)
    expected = read_manifest(path)["files"]
    for name in present:
        _recorded(path, expected, name)
    for name in expected if files is None else files:
        algorithm, digest = _recorded(path, expected, name)
        if _digest(path / name, algorithm) != digest:
            raise ValueError(_mismatch_line(path, name, algorithm))
    if not (files is None if unlisted is None else unlisted):
        return
    extra = sorted(set(_files(path)) - set(expected) - {MANIFEST_FILE})
    if extra:
        raise ValueError(f"checkpoint {path}: {extra[0]} is not listed in {MANIFEST_FILE}")


def _recorded(path: Path, expected: dict[str, str], name: str) -> tuple[str, str]:
    """(algorithm, hex digest) the manifest's `expected` records for the file `name`, which must exist; else the
    one-line ValueError naming what is wrong."""
    recorded = expected.get(name)
    if recorded is None:
        raise ValueError(f"checkpoint {path}: {name} is not listed in {MANIFEST_FILE}")
    if not (path / name).is_file():
        raise ValueError(f"checkpoint {path}: {name} is missing; restore it or use an earlier checkpoint")
    algorithm, _, digest = recorded.rpartition(":")
    algorithm = algorithm or "sha256"
    if algorithm not in _HASHES:
        raise ValueError(f"checkpoint {path}: {name} has a {algorithm} checksum; bigmodel reads {list(_HASHES)}")
    return algorithm, digest


def _mismatch_line(path: Path, name: str, algorithm: str) -> str:
    return (
        f"checkpoint {path}: {name} does not match its {algorithm} checksum in {MANIFEST_FILE} (corrupt or changed); "
        "use an earlier checkpoint"
    )


def verify_shares(names: Collection[str], world_size: int) -> list[list[str]]:
    """The manifest's files `names` shared out over `world_size` ranks for checking: rank r's own shard file
    `__<r>_0.distcp` to rank r (the file it reads when resuming in the layout that saved it, which the check then
    leaves in its page cache), the others in turn."""
    shares: list[list[str]] = [[] for _ in range(world_size)]
    owner = {shard_file(rank): rank for rank in range(world_size)}
    rest = []
    for name in sorted(names):
        if name in owner:
            shares[owner[name]].append(name)
        else:
            rest.append(name)
    for position, name in enumerate(rest):
        shares[position % world_size].append(name)
    return shares


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# xxh3_128 hashes at memory speed (~10x sha256 on one core); the digest guards against corruption, not a crafted
# checkpoint (whoever crafts the files writes the manifest too: bigmodel.checkpoint.safe), so it need not be
# cryptographic. sha256 stays readable for checkpoints written before.
_HASHES: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


DIGEST_SUFFIX = ".digest"
"""A file's checksum left beside it by the rank that wrote it (RawRecordWriter); `_checksums` takes and removes it."""


def _checksums(folder: Path) -> dict[str, str]:
    """`CHECKSUM:<hex digest>` of every file under `folder`, by relative path: the digest its writer left beside it
    (removed here), or else computed from the file (the index, files other tools wrote)."""
    names = _files(folder)
    sums = {}
    for name in (n for n in names if not n.endswith(DIGEST_SUFFIX)):
        left = folder / f"{name}{DIGEST_SUFFIX}"
        if f"{name}{DIGEST_SUFFIX}" in names:
            sums[name] = left.read_text(encoding="utf-8")
            left.unlink()
        else:
            sums[name] = f"{CHECKSUM}:{_digest(folder / name, CHECKSUM)}"
    return sums


def _digest(file: Path, algorithm: str) -> str:
    digest = _HASHES[algorithm]()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
