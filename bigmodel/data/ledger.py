"""The sample ledger: which samples every training step used, written per data-parallel rank, and the comparison
of two runs' ledgers behind `bigmodel data audit`.

A run's ledger is the folder RUN_DIR/ledger:

    rank-XXXXX.bin  one record per step of data-parallel rank XXXXX: a 24-byte header (magic, sample count, step,
                    xxh3-64 of the ids) and the sample ids of the rank's local batch (int64, little-endian, in batch
                    order): 8 bytes per sample and 24 per step. Each record is one append, so a killed run leaves at
                    most a torn last record, which readers ignore.
    layout.jsonl    per start or resume: {"first_step", "dp_size", "microbatches", "global_batch_size"}
    shards.txt      the shard URLs in global order (absent for the shapes source)
    steps.jsonl     {"step", "hash"}: each step's global hash, written by the main rank at every checkpoint

A sample id is (global shard number << 32) | member number within the shard (the shapes source: its index). The
global order of a step is microbatch by microbatch, data-parallel rank by rank (the loader's own order, see
bigmodel/data/loader.py), so it is the same for every layout that trains on the same stream. A step's hash is the
sum mod 2^64 of xxh3-64(step, position, id) over its global batch: it depends on the samples and their order only,
not on the layout, and each rank adds up its own slice without seeing the others'. The chain hash through step s
(the sum of the step hashes 1..s) goes into every checkpoint.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

LEDGER_DIR = "ledger"
"""The ledger's folder inside a run directory."""
SHARD_BITS = 32
"""A sample id's low 32 bits are the member number, the bits above the global shard number."""


def sample_id(shard: int, member: int) -> int:
    """The id of sample number `member` of global shard `shard` (shards numbered over all `::` sources)."""
    return (shard << SHARD_BITS) | member


def split_sample_id(sample_id: int) -> tuple[int, int]:
    """(global shard number, member number) of a sample id."""
    return sample_id >> SHARD_BITS, sample_id & ((1 << SHARD_BITS) - 1)


_HEADER = struct.Struct("<4sIqQ")  # magic, sample count, step, xxh3-64 of the ids
_MAGIC = b"BMLG"
_SAMPLE = struct.Struct("<qqq")  # step, position in the global batch, sample id: one term of a step hash
_MASK = (1 << 64) - 1


def rank_file(folder: Path, dp_rank: int) -> Path:
    """The record file of data-parallel rank `dp_rank`."""
    return folder / f"rank-{dp_rank:05d}.bin"


@dataclass(frozen=True)
class Layout:
    """How the steps from `first_step` on were split over data-parallel ranks (see the module docstring)."""

    first_step: int
    dp_size: int
    microbatches: int
    global_batch_size: int

    def positions(self, dp_rank: int) -> np.ndarray:
        """(global_batch_size / dp_size,) positions in the global batch of rank `dp_rank`'s local rows."""
        micro = self.global_batch_size // self.microbatches
        share = micro // self.dp_size
        starts = np.arange(self.microbatches) * micro + dp_rank * share
        return (starts[:, None] + np.arange(share)[None, :]).reshape(-1)


@dataclass(frozen=True)
class Record:
    """One step of one rank: its sample ids in local batch order."""

    step: int
    ids: np.ndarray


def slice_hash(ids: np.ndarray) -> int:
    """xxh3-64 of a rank's sample ids as little-endian int64 bytes (the record header's check)."""
    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(ids, dtype="<i8").tobytes())


def partial_step_hash(step: int, positions: np.ndarray, ids: np.ndarray) -> int:
    """The share of samples `ids` at global `positions` in the hash of `step` (sum mod 2^64 of their terms)."""
    rows = np.stack([np.full(len(ids), step), positions, ids], axis=1).astype("<i8").tobytes()
    view, size = memoryview(rows), _SAMPLE.size
    return sum(xxhash.xxh3_64_intdigest(view[i : i + size]) for i in range(0, len(rows), size)) & _MASK


def hash_hex(value: int) -> str:
    """A 64-bit hash as the 16 hex digits stored in files and checkpoints."""
    return f"{value & _MASK:016x}"


def read_records(path: Path) -> Iterator[tuple[int, Record]]:
    """(end offset, record) of each whole record of a rank file in order, stopping at a torn or corrupt one."""
    with open(path, "rb") as file:
        while True:
            header = file.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return
            magic, count, step, digest = _HEADER.unpack(header)
            data = file.read(8 * count)
            if magic != _MAGIC or len(data) < 8 * count:
                return
            ids = np.frombuffer(data, dtype="<i8")
            if slice_hash(ids) != digest:
                return
            yield file.tell(), Record(step, ids.astype(np.int64))


def truncate_after(path: Path, step: int) -> list[Record]:
    """Cut a rank file after its records of steps <= `step` (and any torn tail); return the records kept."""
    kept, end = [], 0
    for offset, record in read_records(path):
        if record.step > step:
            break
        kept.append(record)
        end = offset
    os.truncate(path, end)
    return kept


def read_layouts(folder: Path) -> list[Layout]:
    """The layouts of layout.jsonl in order of first_step (a torn last line ignored)."""
    return [Layout(**entry) for entry in _read_jsonl(folder / "layout.jsonl")]


def layout_at(layouts: list[Layout], step: int) -> Layout:
    """The layout that `step` ran with; ValueError if it precedes every layout."""
    found = [layout for layout in layouts if layout.first_step <= step]
    if not found:
        raise ValueError(f"no layout in layout.jsonl covers step {step}; the ledger is incomplete")
    return found[-1]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of a killed run
            break
    return entries


def _write_jsonl(path: Path, entries: list[dict[str, Any]], mode: str = "w") -> None:
    with open(path, mode, encoding="utf-8") as file:
        file.writelines(json.dumps(entry) + "\n" for entry in entries)


Gather = Callable[[Any], list[Any]]
"""Every process's value, in rank order, on the main rank ([] elsewhere); every process calls it together."""


class Ledger:
    """This process's part of a run's ledger: the record files of the ranks that `writes` (one per data-parallel
    rank: tensor and pipeline peers hold the same samples) and, on the main rank, the shared files.

    `open`, `sync` and `close` are collective (every process calls them at the same point, through `gather`);
    `record` is called by every process after each step and writes only where `writes`.
    """

    def __init__(self, folder: Path, layout: Layout, dp_rank: int, writes: bool, is_main: bool, gather: Gather):
        self.folder = folder
        self.layout = layout
        self.dp_rank = dp_rank
        self.writes = writes
        self.is_main = is_main
        self.gather = gather
        self.chain = 0
        """Main rank: the chain hash through the last step synced."""
        self.pending: list[tuple[int, int]] = []
        """(step, this rank's share of its hash) of the steps recorded since the last sync."""
        self.synced_step = 0
        """The last step whose hash is in steps.jsonl and the chain."""
        self._fd: int | None = None

    def open(self, step: int, checkpoint_entry: dict[str, Any] | None, shard_urls: list[str]) -> str | None:
        """Start recording after `step` (0: a fresh start, which clears an old ledger in the folder): every record
        of a later step is dropped, since those steps run again. `checkpoint_entry` is the resumed checkpoint's
        `sync()` value; on the main rank, returns a one-line note if the kept records disagree with it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        files = sorted(self.folder.glob("rank-*.bin"))
        kept = self._truncate(files[self.dp_rank :: self.layout.dp_size] if self.writes else [], step)
        shares = self.gather(kept)
        self.synced_step = step
        self.layout = Layout(step + 1, self.layout.dp_size, self.layout.microbatches, self.layout.global_batch_size)
        if self.writes:
            self._fd = os.open(rank_file(self.folder, self.dp_rank), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if not self.is_main:
            return None
        self._rewrite_shared(step, shard_urls)
        records = sum(count for _, count in shares if count)
        total = sum(share for share, _ in shares) & _MASK
        self.chain = int(checkpoint_entry["hash"], 16) if checkpoint_entry else total
        if checkpoint_entry and records and total != self.chain:
            return (
                f"note: the ledger in {self.folder} does not match the checkpoint of step {step} (hash "
                f"{hash_hex(total)}, checkpoint {checkpoint_entry['hash']}): it was written by another run; "
                "compare runs with `bigmodel data audit`"
            )
        return None

    def _truncate(self, files: list[Path], step: int) -> tuple[int, int]:
        """(sum of the kept records' hash shares, their number) of `files`, each cut after `step`."""
        layouts = read_layouts(self.folder)
        total, count = 0, 0
        for path in files:
            rank = int(path.stem.removeprefix("rank-"))
            for record in truncate_after(path, step):
                layout = layout_at(layouts, record.step)
                total += partial_step_hash(record.step, layout.positions(rank), record.ids)
                count += 1
        return total & _MASK, count

    def _rewrite_shared(self, step: int, shard_urls: list[str]) -> None:
        layouts = [asdict(layout) for layout in read_layouts(self.folder) if layout.first_step <= step]
        _write_jsonl(self.folder / "layout.jsonl", [*layouts, asdict(self.layout)])
        _write_jsonl(
            self.folder / "steps.jsonl", [e for e in _read_jsonl(self.folder / "steps.jsonl") if e["step"] <= step]
        )
        shards = self.folder / "shards.txt"
        if shard_urls:
            shards.write_text("".join(url + "\n" for url in shard_urls), encoding="utf-8")
        elif shards.exists():
            shards.unlink()

    def record(self, step: int, ids: np.ndarray) -> None:
        """Append this rank's sample ids of `step` (its local batch, in batch order) to its record file."""
        if not self.writes:
            return
        ids = np.ascontiguousarray(ids, dtype="<i8")
        header = _HEADER.pack(_MAGIC, len(ids), step, slice_hash(ids))
        os.write(self._fd, header + ids.tobytes())  # one append: a kill leaves whole records and at most a torn one
        self.pending.append((step, partial_step_hash(step, self.layout.positions(self.dp_rank), ids)))

    def sync(self) -> dict[str, Any]:
        """Add the steps recorded since the last sync to steps.jsonl and the chain hash; return the checkpoint's
        entry {"step", "hash"} (meaningful on the main rank)."""
        gathered = [shares for shares in self.gather(self.pending if self.writes else None) if shares is not None]
        self.pending = []
        if not self.is_main:
            return {}
        entries = []
        for parts in zip(*gathered, strict=True):
            step = parts[0][0]
            step_hash = sum(share for _, share in parts) & _MASK
            self.chain = (self.chain + step_hash) & _MASK
            entries.append({"step": step, "hash": hash_hex(step_hash)})
        _write_jsonl(self.folder / "steps.jsonl", entries, mode="a")
        self.synced_step = entries[-1]["step"] if entries else self.synced_step
        return {"step": self.synced_step, "hash": hash_hex(self.chain)}

    def close(self) -> None:
        """Close this rank's record file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class GlobalStep:
    """One step of a run as the ledger holds it: sample ids in global order and the rank that held each."""

    step: int
    ids: np.ndarray
    ranks: np.ndarray

    @property
    def hash(self) -> int:
        """The step's hash (what steps.jsonl holds), from its global order."""
        return partial_step_hash(self.step, np.arange(len(self.ids)), self.ids)


class RunLedger:
    """A run's ledger read back: its layouts, shard URLs and, step by step, each step's global order."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / LEDGER_DIR
        self.layouts = read_layouts(self.folder)
        if not self.layouts:
            raise ValueError(
                f"{self.run_dir} has no ledger ({self.folder / 'layout.jsonl'} is missing or empty); give a run "
                "directory trained with data.ledger: true"
            )
        shards = self.folder / "shards.txt"
        self.shard_urls = shards.read_text(encoding="utf-8").splitlines() if shards.exists() else []
        self.incomplete: str | None = None
        """Why reading stopped before the end of the records, if it did (a rank lacks a step the others have)."""

    def name(self, sample_id: int) -> str:
        """A sample as a person looks it up: shard URL and member number, or the index for the shapes source."""
        if not self.shard_urls:
            return f"index {sample_id}"
        shard, member = split_sample_id(sample_id)
        url = self.shard_urls[shard] if 0 <= shard < len(self.shard_urls) else f"shard #{shard} (not in shards.txt)"
        return f"{url} member {member}"

    def steps(self) -> Iterator[GlobalStep]:
        """Every step all of whose ranks have a record, in order, until the first step some rank lacks."""
        readers: dict[int, Iterator[tuple[int, Record]]] = {}
        ahead: dict[int, Record] = {}

        def next_record(rank: int, step: int | None = None) -> Record | None:
            """Rank's record of `step` (None: its next record), skipping any earlier ones."""
            if rank not in readers:
                path = rank_file(self.folder, rank)
                readers[rank] = read_records(path) if path.exists() else iter(())
            record = ahead.pop(rank, None)
            while record is None or (step is not None and record.step < step):
                record = next(readers[rank], (0, None))[1]
                if record is None:
                    return None
            if step is not None and record.step != step:
                ahead[rank] = record
                return None
            return record

        while (first := next_record(0)) is not None:
            layout = layout_at(self.layouts, first.step)
            ids = np.empty(layout.global_batch_size, dtype=np.int64)
            ranks = np.empty(layout.global_batch_size, dtype=np.int64)
            for rank in range(layout.dp_size):
                record = first if rank == 0 else next_record(rank, first.step)
                if record is None:
                    self.incomplete = f"rank {rank} has no record of step {first.step}; later steps are not read"
                    return
                ids[layout.positions(rank)], ranks[layout.positions(rank)] = record.ids, rank
            yield GlobalStep(first.step, ids, ranks)


@dataclass(frozen=True)
class Difference:
    """The first sample where two runs differ: its step, position in the global batch and what each run had."""

    step: int
    position: int
    rank_a: int | None
    rank_b: int | None
    sample_a: str
    sample_b: str


@dataclass
class Audit:
    """The outcome of `audit_runs`: the steps compared, those only one run has, and the first difference."""

    agreed: list[int]
    """Steps both runs have and agree on, in order (up to the first difference)."""
    samples: int
    only_a: list[int]
    only_b: list[int]
    difference: Difference | None
    notes: list[str]

    @property
    def agree(self) -> bool:
        """True if the runs share at least one step and agree on every shared step."""
        return self.difference is None and bool(self.agreed)

    def lines(self, name_a: str, name_b: str) -> list[str]:
        """The report `bigmodel data audit` prints."""
        lines = list(self.notes)
        if self.agreed:
            lines.append(f"runs agree on steps {_steps(self.agreed)} ({self.samples} samples)")
        d = self.difference
        if d is not None:
            lines.append(
                f"runs differ at step {d.step}, position {d.position} of the global batch: {name_a} has "
                f"{d.sample_a}{_held(d.rank_a)}, {name_b} has {d.sample_b}{_held(d.rank_b)}"
            )
        elif not self.agreed:
            lines.append("the runs have no step in common")
        lines += [
            f"steps {_steps(steps)} only in {name}"
            for steps, name in ((self.only_a, name_a), (self.only_b, name_b))
            if steps
        ]
        return lines


def _steps(steps: list[int]) -> str:
    contiguous = steps[-1] - steps[0] + 1 == len(steps)
    return f"{steps[0]}..{steps[-1]}" if contiguous else f"{steps[0]}..{steps[-1]} ({len(steps)} of them)"


def _held(rank: int | None) -> str:
    return "" if rank is None else f" (rank {rank})"


def _in_numbering_of(a: RunLedger, b: RunLedger) -> Callable[[np.ndarray], np.ndarray]:
    """Maps run b's sample ids to run a's shard numbering (by URL), so equal ids mean equal samples."""
    if a.shard_urls == b.shard_urls or not (a.shard_urls and b.shard_urls):
        return lambda ids: ids
    numbers = {url: number for number, url in enumerate(a.shard_urls)}
    # A shard run a does not have gets a number a never uses, so its samples never compare equal.
    unknown = iter(range(len(a.shard_urls), len(a.shard_urls) + len(b.shard_urls)))
    table = np.array([numbers[url] if url in numbers else next(unknown) for url in b.shard_urls], dtype=np.int64)
    low = (1 << SHARD_BITS) - 1
    return lambda ids: (table[ids >> SHARD_BITS] << SHARD_BITS) | (ids & low)


def _first_difference(
    a: RunLedger, b: RunLedger, step_a: GlobalStep, step_b: GlobalStep, ids_b: np.ndarray
) -> Difference | None:
    """The first position where two runs' versions of one step differ, or None."""
    n = min(len(step_a.ids), len(ids_b))
    differ = np.flatnonzero(step_a.ids[:n] != ids_b[:n])
    if len(differ) == 0 and len(step_a.ids) == len(ids_b):
        return None
    p = int(differ[0]) if len(differ) else n

    def named(run: RunLedger, step: GlobalStep) -> tuple[int | None, str]:
        if p >= len(step.ids):
            return None, f"no sample (its global batch has {len(step.ids)})"
        return int(step.ranks[p]), run.name(int(step.ids[p]))

    (rank_a, sample_a), (rank_b, sample_b) = named(a, step_a), named(b, step_b)
    return Difference(step_a.step, p, rank_a, rank_b, sample_a, sample_b)


def audit_runs(run_a: str | Path, run_b: str | Path) -> Audit:
    """Compare two runs' ledgers step by step (each step's global order, samples named by shard URL and member).

    Stops at the first difference; steps only one run has are listed (a run stopped early is not a difference).
    Raises ValueError if either directory has no ledger.
    """
    a, b = RunLedger(run_a), RunLedger(run_b)
    audit = Audit([], 0, [], [], None, [])
    _compare(a, b, audit)
    audit.notes += [f"{run.run_dir}: {run.incomplete}" for run in (a, b) if run.incomplete]
    return audit


def _compare(a: RunLedger, b: RunLedger, audit: Audit) -> None:
    """Merge the two runs' steps by number into `audit`, up to the first difference."""
    translate = _in_numbering_of(a, b)
    steps_a, steps_b = a.steps(), b.steps()
    step_a, step_b = next(steps_a, None), next(steps_b, None)
    while step_a is not None and step_b is not None:
        if step_a.step != step_b.step:
            behind_a = step_a.step < step_b.step
            (audit.only_a if behind_a else audit.only_b).append(min(step_a.step, step_b.step))
            step_a, step_b = (next(steps_a, None), step_b) if behind_a else (step_a, next(steps_b, None))
            continue
        audit.difference = _first_difference(a, b, step_a, step_b, translate(step_b.ids))
        if audit.difference is not None:
            return
        audit.agreed.append(step_a.step)
        audit.samples += len(step_a.ids)
        step_a, step_b = next(steps_a, None), next(steps_b, None)
    for first, rest, only in ((step_a, steps_a, audit.only_a), (step_b, steps_b, audit.only_b)):
        if first is not None:
            only.append(first.step)
            only.extend(step.step for step in rest)
