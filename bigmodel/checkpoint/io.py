"""How checkpoints use the CPU and the disk: what overlaps the disk with Python work and keeps memory down, apart
from what is saved. Each measured in docs/benchmarks.md, row g; each is a no-op where the system lacks the call.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import queue
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


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
    disk writes while the writer prepares the next records and the closing fsync waits for the last few MiB only.
    Nothing where the C library lacks sync_file_range (it is Linux's)."""

    def __init__(self, f: Any, every: int = 8 << 20) -> None:
        self.f, self.every, self.started = f, every, 0

    def wrote(self) -> None:
        end = self.f.tell()
        if _SYNC_FILE_RANGE is None or end - self.started < self.every:
            return
        self.f.flush()
        _SYNC_FILE_RANGE(self.f.fileno(), self.started, end - self.started, _SYNC_FILE_RANGE_WRITE)
        self.started = end


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block. Building a checkpoint's state dict and index allocates
    thousands of small objects, which would trigger full collections over a training process's many objects;
    everything checkpointing allocates is freed by reference counting."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Prefetch:
    """The reading thread of `prefetching`, and the digests of the files it hashes as it reads them."""

    def __init__(self, files: list[Path], hashers: dict[Path, Callable[[], Any]]) -> None:
        self.hashers = hashers
        self._digests: dict[Path, str] = {}
        self.thread = threading.Thread(target=self._read, args=(files,), name="bigmodel-prefetch", daemon=True)

    def _read(self, files: list[Path]) -> None:
        scratch = memoryview(bytearray(16 << 20))
        for file in files:
            digest = self.hashers[file]() if file in self.hashers else None
            with open(file, "rb", buffering=0) as f:
                while size := f.readinto(scratch):
                    if digest is not None:
                        digest.update(scratch[:size])  # xxhash and hashlib release the GIL for large buffers
            if digest is not None:
                self._digests[file] = digest.hexdigest()

    def digests(self) -> dict[Path, str]:
        """Hex digest of each hashed file read so far; waits for the reading to end. Only for a started prefetch."""
        self.thread.join()
        return self._digests


@contextlib.contextmanager
def prefetching(files: list[Path], hashers: dict[Path, Callable[[], Any]] | None = None) -> Iterator[Prefetch]:
    """Read `files` into the page cache on a background thread while the block builds the state dict and DCP plans
    the load, so the disk is busy from the start and the reads that follow copy from memory. Skipped where the files
    would take more than a quarter of the memory free now (their pages would be evicted before they are read), unless
    a file is to be hashed: `hashers` maps files to a hash constructor, the digest computed as they are read.

    For the block, the interpreter hands the GIL between threads every 0.5 ms instead of 5, so the reading thread
    is not kept waiting between two reads while this thread plans (docs/benchmarks.md, row g)."""
    hashers = hashers or {}
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no such sysconf name here
        free = 0
    if not hashers and (not files or sum(file.stat().st_size for file in files) > free // 4):
        yield Prefetch([], {})
        return
    prefetch = Prefetch(files, hashers)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 0.0005))
    try:
        prefetch.thread.start()
        yield prefetch
    finally:
        sys.setswitchinterval(interval)


def return_freed_memory() -> None:
    """Hand the heap's freed blocks back to the OS (glibc's malloc_trim; a no-op elsewhere).

    The streaming tools free each tensor before reading the next, but glibc keeps freed multi-MB blocks in the heap,
    so the resident size would creep up by a few tensors' worth of fragments; trimming once per tensor keeps the
    peak at what is really held."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()

PURGE_PREFIX = ".purge_"
"""A folder being deleted: `.purge_<name>.<random>` beside where it was."""


def _retire(folder: Path) -> Path | None:
    """Rename `folder` (if it exists) to `.purge_<name>.<random>` beside itself, so it stops being a checkpoint at
    once; the new name, or None."""
    if not folder.exists():
        return None
    trash = folder.parent / f"{PURGE_PREFIX}{folder.name}.{uuid.uuid4().hex[:8]}"
    os.replace(folder, trash)
    return trash


def remove_folder(folder: Path, purger: Purger | None = None) -> None:
    """Delete `folder` (if it exists): by `purger` in the background, else now. Renamed first either way
    (`_retire`), so a half-deleted folder is no checkpoint."""
    if purger is not None:
        purger.purge(folder)
    elif (trash := _retire(Path(folder))) is not None:
        shutil.rmtree(trash, ignore_errors=True)


class Purger:
    """Deletes folders on a background thread. Deleting a large checkpoint takes seconds to minutes on a parallel
    filesystem, which every rank would wait for at the next barrier. Owned by whoever checkpoints a run: `close()`
    waits for the pending deletions; what a killed process left is deleted by the next save there (purge_leftovers).
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending: set[Path] = set()
        """Folders handed to the thread and not yet deleted (guarded by _lock)."""

    def purge(self, folder: Path) -> None:
        """Delete `folder` (if it exists) without waiting: renamed at once (`_retire`), removed by the thread."""
        trash = _retire(Path(folder))
        if trash is not None:
            self._queue_deletion(trash)

    def purge_leftovers(self, parent: Path) -> None:
        """Delete the `.purge_*` folders a killed process left in `parent`. Those this purger is deleting already are
        left to that deletion: renaming a folder while it is being deleted made both fail."""
        for leftover in Path(parent).glob(f"{PURGE_PREFIX}*"):
            self._queue_deletion(leftover)

    def _queue_deletion(self, trash: Path) -> None:
        with self._lock:
            if trash in self._pending:
                return
            self._pending.add(trash)
            if self._thread is None:
                self._thread = threading.Thread(target=self._delete, name="bigmodel-purge", daemon=True)
                self._thread.start()
        self._queue.put(trash)

    def _delete(self) -> None:
        while (trash := self._queue.get()) is not None:
            try:
                shutil.rmtree(trash, ignore_errors=True)
            finally:
                with self._lock:
                    self._pending.discard(trash)
                self._queue.task_done()
        self._queue.task_done()

    def wait(self) -> None:
        """Return once every folder handed to this purger so far is deleted."""
        self._queue.join()

    def close(self) -> None:
        """Wait for the pending deletions and end the thread (a later purge starts another)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()
