"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards of the model and the
optimizer state, and a checkpoint loads into any parallel layout (DCP reshards on load).

What is saved is a state dict from its owner (`Checkpointable`: an engine), which does not depend on the layout:
parameters under the unsplit model's names (tensors, or DTensors whose global shape is the parameter's), AdamW's
state per parameter name in the flattened form of `torch.distributed.checkpoint.state_dict` (`state.<name>.exp_avg`,
...) with each parameter's hyper-parameters in one item (`param_groups.<name>`: records.pack_hyperparameters), and
the LR schedule. Layout of one checkpoint folder:
  __<rank>_0.distcp     one file per saving rank (RawRecordWriter): each tensor shard as its raw bytes, each other
                        item (hyper-parameters, schedule) as a pickle of plain data (`records.plain_record`; a
                        torch.save of it where it holds anything else)
  .metadata             DCP's index: every item's dtype, shape, chunks and place in the files
  manifest.json         format, byte order, step, the caller's JSON `extra`, the layout saved from, torch version, a
                        checksum of every file ("xxh3_128:<hex>"; a bare hex digest is sha256, as format 2 wrote them)
A checkpoint is written to a temporary folder next to `path` and renamed to `path` once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Collection
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from bigmodel.checkpoint.io import Purger, Writeback, gc_paused, prefetching, remove_folder
from bigmodel.checkpoint.manifest import (
    CHECKSUM,
    DIGEST_SUFFIX,
    HASHES,
    MANIFEST_FILE,
    checked_while_loading,
    checksums,
    mismatch_line,
    read_manifest,
    recorded,
    require_fields,
)
from bigmodel.checkpoint.records import plain_record, tensor_bytes
from bigmodel.checkpoint.safe import load_dcp, single_process

# 2: hyper-parameters in one item per parameter (pack_hyperparameters); 3: tensors as raw bytes (RawRecordWriter)
FORMAT = "bigmodel-sharded-3"


class Checkpointable(Protocol):
    """What save_sharded and load_sharded take: torch's Stateful (`state_dict()` in the form above, sharing storage
    with the live tensors where it can so `dcp.load` fills them in place; `load_state_dict(state)` takes it back) and
    the parallel layout the manifest records. Every rank calls `state_dict()` (it may be a collective)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def layout(self) -> dict[str, Any]: ...


class RawRecordWriter(FileSystemWriter):
    """DCP's FileSystemWriter with each tensor stored as its raw bytes (`tensor_bytes`) instead of a `torch.save`.

    DCP's index already holds every stored chunk's dtype and shape, so a record needs no header, and loading a raw
    record unpickles nothing (bigmodel.checkpoint.safe.SafeReader reads them); torch.save's framing costs much more
    (docs/benchmarks.md, row g). Non-tensor items (hyper-parameters, the schedule) are `plain_record`s where they are
    plain data, else DCP's torch.save. One file per rank, `__<rank>_0.distcp`, fsynced before the index is written;
    the thread_count and serialization_format options do not apply.

    Each rank checksums its file as it writes it and leaves the digest beside it (`<file>.digest`), which the main
    rank takes into the manifest (`checksums`) instead of reading every rank's bytes back.
    """

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future[list[WriteResult]]:
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results = []
        digest = HASHES[CHECKSUM]()
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
    them in file order while the disk still delivers the rest (io.prefetching), so its many small records (step
    counters, biases, norms) cost Python time while the disk reads the large ones, not after it is done."""
    if item.tensor_data is None:
        return 0
    return item.tensor_data.chunk.sizes.numel() * item.tensor_data.properties.dtype.itemsize


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

    Rank 0 finishes it (`finish`: checksums, manifest, rename to the final folder, then `on_complete(path)`) once
    every rank's files are written: in DCP's background thread for an async save, before the save returns otherwise.
    Other ranks only wait for their own shards. Neither step runs a collective on the training group.
    """

    def __init__(
        self,
        tmp: Path,
        path: Path,
        manifest: dict[str, Any],
        on_complete: Callable[[Path], None] | None,
        purger: Purger | None,
    ):
        self.tmp, self.path, self.manifest, self.on_complete, self.purger = tmp, path, manifest, on_complete, purger
        self.future: Future | None = None
        self._finished = threading.Event()
        self._error: BaseException | None = None

    def start_background(self, future: Future) -> None:
        self.future = future
        future.add_done_callback(lambda _: self.finish())

    def finish(self) -> None:
        """Complete the checkpoint once every rank's files are in the temporary folder (rank 0's work)."""
        try:
            if self.future is not None:
                self.future.result()  # re-raises a failed write
            if _is_main():
                self.manifest["files"] = checksums(self.tmp)
                (self.tmp / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2), encoding="utf-8")
                remove_folder(self.path, self.purger)  # the checkpoint this one replaces, if any
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


def start_save(
    path: Path, manifest: dict[str, Any], on_complete: Callable[[Path], None] | None, purger: Purger | None
) -> PendingSave:
    """Check that `manifest` is JSON and prepare an empty temporary folder beside `path` (all ranks wait for it): the
    start of every checkpoint save, whichever files it writes."""
    try:
        json.dumps(manifest)
    except TypeError as err:
        raise TypeError(f"saving {path}: extra must be JSON ({err}); keep tensors in the engine state") from None
    tmp = path.parent / f".tmp_{path.name}"
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if purger is not None:
            purger.purge_leftovers(path.parent)
    if dist.is_initialized():
        dist.barrier()
    return PendingSave(tmp, path, manifest, on_complete, purger)


def _save_planner() -> DefaultSavePlanner:
    """DCP's planner, reusing the previous save's plan while the state's structure is unchanged (every periodic save
    of a run after the first) and not looking for ShardedTensors, which bigmodel never holds."""
    return DefaultSavePlanner(flatten_sharded_tensors=False, enable_plan_caching=True)


def save_sharded(
    path: str | Path,
    state: Checkpointable,
    extra: dict[str, Any],
    on_complete: Callable[[Path], None] | None = None,
    async_: bool = False,
    group: dist.ProcessGroup | None = None,
    purger: Purger | None = None,
) -> PendingSave:
    """Write `state.state_dict()` to the folder `path` (replacing one there). Every rank calls it.

    `extra` (the step, data position, ...) must be JSON; it goes into manifest.json and `load_sharded` returns it.
    The shards are written to `.tmp_<name>` beside `path`, which rank 0 renames to `path` after every rank is done,
    then calls `on_complete(path)`. Returns the save, complete unless `async_`: then the state is copied to host
    memory and written by a thread while the caller trains on; `group` is a gloo process group used only for
    checkpoints (None in a single process), so the writer's collectives never interleave with training's. Call
    `.wait()` before the next save and before the process exits. `purger` deletes the replaced checkpoint in the
    background (else it is deleted before the rename).
    """
    path = Path(path)
    manifest = {"format": FORMAT, "byteorder": sys.byteorder, "step": extra.get("step"), "extra": extra}
    manifest |= {"layout": state.layout(), "world_size": _world_size(), "torch": torch.__version__}
    pending = start_save(path, manifest, on_complete, purger)
    writer = RawRecordWriter(pending.tmp)
    # gc paused for the state dict (and an async save's copy to host memory); a writing thread runs with it on
    with gc_paused(), single_process() as no_dist:
        if async_:
            response = dcp.async_save(
                state.state_dict(), storage_writer=writer, planner=_save_planner(), process_group=group, no_dist=no_dist
            )
        else:
            dcp.save(state.state_dict(), storage_writer=writer, planner=_save_planner(), no_dist=no_dist)
    if async_:
        pending.start_background(getattr(response, "upload_completion", response))  # a Future, or one in a response
        return pending
    if dist.is_initialized():
        dist.barrier()
    pending.finish()
    if dist.is_initialized():
        dist.barrier()
    pending.wait()
    return pending


def load_sharded(path: str | Path, state: Checkpointable, checked: Collection[str] = ()) -> dict[str, Any]:
    """Load the checkpoint at `path` into `state`, whatever layout it was saved from, and return its `extra`.

    Every rank calls it. It checks no checksum (verify_manifest does) except those of `checked`: this rank's own
    shard file (`checked_while_loading`), hashed as the prefetch reads it from the disk, so a resume reads it once
    instead of once to check and once to load. A mismatch raises verify_manifest's one-line ValueError on every rank,
    after `state` has taken the file's contents: the caller must not go on with it. A pickled object that is not
    plain checkpoint data raises UnsafeCheckpointError (a ValueError) without being run.
    """
    path = Path(path)
    manifest = read_sharded_manifest(path)
    own = _own_files(path, manifest)
    hashed = {path / name: recorded(path, manifest["files"], name) for name in checked}
    if not hashed.keys() <= set(own):
        raise ValueError(f"checkpoint {path}: {sorted(checked)} are not all files this rank loads whole")
    with prefetching(own, {file: HASHES[algorithm] for file, (algorithm, _) in hashed.items()}) as prefetch:
        try:
            with gc_paused():
                loaded = state.state_dict()
                load_dcp(loaded, path)  # never unpickles code from the checkpoint (bigmodel.checkpoint.safe)
                state.load_state_dict(loaded)
        except Exception as err:  # a corrupt file may fail to parse before its checksum is known: name the cause
            if problem := _mismatch(hashed, prefetch.digests):
                raise ValueError(problem) from err
            raise
        problem = _mismatch(hashed, prefetch.digests)
    if hashed and dist.is_initialized():  # every rank stops together, with the first failing rank's line
        problems: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        raise ValueError(problem)
    return manifest["extra"]


def _mismatch(hashed: dict[Path, tuple[str, str]], digests: Callable[[], dict[Path, str]]) -> str | None:
    """verify_manifest's line for the first hashed file whose digest (once read) is not its recorded one; else None."""
    if not hashed:
        return None
    found = digests()
    for file, (algorithm, digest) in hashed.items():
        if found.get(file) != digest:
            return mismatch_line(file.parent, file.name, algorithm)
    return None


def _own_files(path: Path, manifest: dict[str, Any]) -> list[Path]:
    """The shard files this rank will read: its own where the checkpoint was saved by as many ranks (a resume), else
    none known before planning (a reshard, which reads parts of several)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return [path / name for name in checked_while_loading(manifest, rank, _world_size()) if (path / name).is_file()]


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
    return require_fields(manifest, ("files", "extra"), str(Path(path) / MANIFEST_FILE))


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
