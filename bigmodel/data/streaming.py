"""The streaming read mode: whole shards dealt to readers, read front to back through a shuffle buffer.

Each data-parallel rank runs S readers (data.streams; 0: one per DataLoader worker). Reader g = dp_rank * S + s of
the N = dp_size * S readers reads one shard after another:
- without data.resampled, epoch e of every shard group is a permutation seeded by (seed, group, e) and reader g
  takes every N-th shard of it, so each epoch reads every shard once;
- with data.resampled, the reader draws each next shard with replacement from its own seeded RNG.
Without data.train_weights all shards form one group. With weights, each `::` source is a group and every shard of
source i weighs train_weights[i] (OpenCLIP's upsampling factors): the next shard comes from source i with
probability w_i * n_i / sum_j w_j * n_j (n_i: its shards), then the next of its epoch (or a uniform draw).

A reader passes samples through a shuffle buffer of data.shuffle_buffer samples. Local batch k of a rank is built
whole by its reader k % S, and DataLoader worker w of W builds batches k = w, w + W, ... (W divides S), so the
batches do not depend on data.num_workers. Each batch travels with its reader's state right after it (shard,
byte offset of the next tar header, the buffered samples as byte ranges, RNG), so `state_dict` covers exactly the
batches handed out: a resume with the same (dp_size, S, seed, shards) continues exactly, refetching the buffered
samples by byte range; any other layout starts fresh epochs and says so.

A sample's id is (global shard number << 32) | its number among the samples of its shard (every key group
counts, usable or not), global shard numbers counting the shards of all `::` sources in order.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bigmodel.config.schema import Config, DataConfig
from bigmodel.data.dataset import ImageTextDataset
from bigmodel.data.index import MEMBER_NAME
from bigmodel.data.ledger import sample_id
from bigmodel.data.loader import EVAL_SEED
from bigmodel.data.locations import (
    ReadOptions,
    expand_source,
    is_local,
    is_pipe,
    open_stream,
    read_range,
    split_sources,
)
from bigmodel.data.shards import BadSample, MissingCaptionKey, decode_image, parse_sample

logger = logging.getLogger(__name__)

_DEAL_STREAM, _READER_STREAM, _SAMPLE_STREAM, _EVAL_SAMPLE_STREAM = 3, 4, 5, 6
"""First word of the seed keys here; loader.py's streams are 0-2, so no two kinds of draw ever share a stream."""
_TAR_BLOCK = 512
_CAPTION_KEY_PROBE = 16
"""This many samples in a row without the JSON caption key are an error (a wrong data.caption_key), not skips."""
_REFETCH_THREADS = 16
"""Parallel ranged reads that refill the shuffle buffers on resume."""


def read_mode(cfg: DataConfig, spec: str) -> Literal["indexed", "streaming"]:
    """The read mode of the shards `spec` under data.mode: auto is indexed when every `::` source is on a local file
    system and streaming otherwise; the embedded shapes source (and no shards) is always indexed."""
    if cfg.source == "shapes" or not spec:
        return "indexed"
    if cfg.mode != "auto":
        return cfg.mode
    return "indexed" if all(is_local(source) for source in split_sources(spec)) else "streaming"


class TarSample(NamedTuple):
    """One sample as a shard holds it: its number in the shard, key, member bytes by extension (lowercase), the
    byte range [start, end) from its first header to the next sample's, and whether it is the shard's last."""

    member: int
    key: str
    members: dict[str, bytes]
    start: int
    end: int
    last: bool = False


def read_tar_samples(stream: BinaryIO, offset: int = 0, member: int = 0) -> Iterator[TarSample]:
    """The samples of an uncompressed tar read sequentially from `stream`, which starts at byte `offset` of the
    shard on a header boundary (numbered from `member`). Consecutive members sharing a WebDataset key form a
    sample; raises tarfile.TarError where the tar is corrupt or truncated."""
    key, start, end, members = None, offset, offset, {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            match = MEMBER_NAME.match(info.name)
            if not (info.isfile() and match):
                continue
            if match.group(1) != key:
                if key is not None:
                    yield TarSample(member, key, members, start, offset + info.offset)
                    member += 1
                key, start, members = match.group(1), offset + info.offset, {}
            members[match.group(2).lower()] = tar.extractfile(info).read()
            end = offset + info.offset_data + -(-info.size // _TAR_BLOCK) * _TAR_BLOCK
    if key is not None:
        yield TarSample(member, key, members, start, end, last=True)


def shard_samples(url: str, offset: int, member: int, options: ReadOptions) -> Iterator[TarSample]:
    """`read_tar_samples` of the shard `url` from byte `offset` (a header boundary), closing it when done."""
    with open_stream(url, offset, options) as stream:
        yield from read_tar_samples(stream, offset, member)


@dataclass(frozen=True)
class StreamShards:
    """The shard URLs of a `::`-joined data spec in global order, and the global shard numbers of each source."""

    urls: list[str]
    sources: list[range]

    @classmethod
    def from_spec(cls, spec: str) -> StreamShards:
        urls, sources = [], []
        for pattern in split_sources(spec):
            expanded = expand_source(pattern)
            sources.append(range(len(urls), len(urls) + len(expanded)))
            urls.extend(expanded)
        return cls(urls, sources)

    def digest(self) -> str:
        """A short hash of the URL list: a resume checks it to know the shard numbers still mean the same."""
        return hashlib.sha256("\n".join(self.urls).encode()).hexdigest()[:16]


class _Buffered(NamedTuple):
    """A sample in a shuffle buffer: where it is (saved in the state) and what it holds (refetched on resume)."""

    shard: int
    member: int
    start: int
    end: int
    image: bytes
    ext: str
    caption: str


@dataclass(frozen=True)
class _Plan:
    """What every reader of a run shares: the shard groups and how to draw from them."""

    shards: StreamShards
    groups: list[np.ndarray]
    """Global shard numbers of each group (all shards, or one group per source)."""
    group_p: np.ndarray
    readers: int
    seed: int
    resampled: bool
    buffer: int
    caption_key: str
    options: ReadOptions

    @classmethod
    def build(cls, shards: StreamShards, cfg: Config, readers: int) -> _Plan:
        """The plan for `readers` readers of `shards` under cfg.data; ValueError if, without resampling, a group
        has fewer shards than there are readers (some reader would have none)."""
        d = cfg.data
        if d.train_weights:
            groups = [np.arange(r.start, r.stop) for r in shards.sources]
        else:
            groups = [np.arange(len(shards.urls))]
        mass = np.array([w * len(g) for w, g in zip(d.train_weights or [1.0], groups, strict=True)])
        for number, group in enumerate(groups):
            if not d.resampled and len(group) < readers:
                what = f"source {number + 1} of data.train_shards has" if d.train_weights else "data.train_shards has"
                raise ValueError(
                    f"{what} {len(group)} shards, fewer than the {readers} readers (data-parallel ranks x "
                    "data.streams, by default data.num_workers) that each read whole shards; use more shards, fewer "
                    "streams or data.resampled=true"
                )
        return cls(
            shards=shards,
            groups=groups,
            group_p=mass / mass.sum(),
            readers=readers,
            seed=cfg.train.seed,
            resampled=d.resampled,
            buffer=d.shuffle_buffer,
            caption_key=d.caption_key,
            options=ReadOptions(retries=d.retries),
        )

    def deal(self, group: int, epoch: int, reader: int) -> np.ndarray:
        """The shards of `group` that `reader` reads in `epoch`, in order."""
        order = np.random.default_rng([_DEAL_STREAM, self.seed, group, epoch]).permutation(len(self.groups[group]))
        return self.groups[group][order[reader :: self.readers]]


def _fresh_reader_state(seed: int, reader: int, generation: int, epoch: int, groups: int) -> dict[str, Any]:
    """The state of reader `reader` before it reads anything; `generation` (the step the assignment started at)
    seeds its RNG and sample keys, so a fresh assignment after a layout change draws anew."""
    rng = np.random.default_rng([_READER_STREAM, seed, reader, generation])
    return {
        "reader": reader,
        "generation": generation,
        "rng": rng.bit_generator.state,
        "deals": [[epoch, 0] for _ in range(groups)],
        "shard": -1,
        "offset": 0,
        "member": 0,
        "emitted": 0,
        "skipped": 0,
        "buffer": [],
    }


class _Reader:
    """One reader's shard sequence, open shard and shuffle buffer (see the module docstring)."""

    def __init__(self, plan: _Plan, state: dict[str, Any]) -> None:
        self.plan = plan
        self.number, self.generation = state["reader"], state["generation"]
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.deals = [list(deal) for deal in state["deals"]]
        self.shard, self.offset, self.member = state["shard"], state["offset"], state["member"]
        self.emitted, self.skipped = state["emitted"], state["skipped"]
        self.buffer = _refetch(plan, state["buffer"])
        self.samples: Iterator[TarSample] | None = None
        self._dealt: dict[tuple[int, int], np.ndarray] = {}

    def state(self) -> dict[str, Any]:
        """JSON-able state from which a `_Reader` continues exactly where this one is."""
        return {
            "reader": self.number,
            "generation": self.generation,
            "rng": self.rng.bit_generator.state,
            "deals": [list(deal) for deal in self.deals],
            "shard": self.shard,
            "offset": self.offset,
            "member": self.member,
            "emitted": self.emitted,
            "skipped": self.skipped,
            "buffer": [[b.shard, b.member, b.start, b.end] for b in self.buffer],
        }

    def _next_shard(self) -> int:
        plan = self.plan
        group = int(self.rng.choice(len(plan.groups), p=plan.group_p)) if len(plan.groups) > 1 else 0
        if plan.resampled:
            return int(plan.groups[group][self.rng.integers(len(plan.groups[group]))])
        epoch, position = self.deals[group]
        if position == len(self._deal(group, epoch)):
            epoch, position = epoch + 1, 0
        self.deals[group] = [epoch, position + 1]
        return int(self._deal(group, epoch)[position])

    def _deal(self, group: int, epoch: int) -> np.ndarray:
        if (group, epoch) not in self._dealt:
            self._dealt = {k: v for k, v in self._dealt.items() if k[0] != group}
            self._dealt[(group, epoch)] = self.plan.deal(group, epoch, self.number)
        return self._dealt[(group, epoch)]

    def _next_tar_sample(self) -> tuple[int, TarSample | None]:
        """(shard, its next sample) of the open shard, opening the next shard first if none is open; the sample is
        None where the shard turned out to hold no more. After a shard's last sample no shard is open, so a state
        saved then resumes at the next shard."""
        if self.shard < 0:
            self.shard, self.offset, self.member = self._next_shard(), 0, 0
        if self.samples is None:
            url = self.plan.shards.urls[self.shard]
            self.samples = shard_samples(url, self.offset, self.member, self.plan.options)
        try:
            sample = next(self.samples, None)
        except tarfile.TarError as error:
            url = self.plan.shards.urls[self.shard]
            logger.warning(
                "%s: corrupt or truncated tar after byte %d (%s); skipping the rest", url, self.offset, error
            )
            sample = None
        shard = self.shard
        if sample is not None:
            self.offset, self.member = sample.end, sample.member + 1
        if sample is None or sample.last:
            self.samples.close()
            self.shard, self.samples = -1, None
        return shard, sample

    def _read(self) -> _Buffered:
        """The next usable-looking sample of the shard sequence (bad ones are counted in `skipped`)."""
        shards_ended = missing_key = 0
        while True:
            shard, sample = self._next_tar_sample()
            if sample is None or sample.last:
                shards_ended += 1
                if shards_ended > len(self.plan.shards.urls):
                    raise RuntimeError(
                        f"streaming reader {self.number} read {shards_ended} shards in a row without a usable "
                        "sample; check data.train_shards and data.caption_key"
                    )
            if sample is None:
                continue
            try:
                image, ext, caption = parse_sample(sample.key, sample.members, self.plan.caption_key)
            except BadSample as error:
                self.skipped += 1
                url = self.plan.shards.urls[shard]
                missing_key = missing_key + 1 if isinstance(error, MissingCaptionKey) else 0
                if missing_key == _CAPTION_KEY_PROBE:
                    raise ValueError(
                        f"data.caption_key {self.plan.caption_key!r}: {missing_key} samples in a row of {url} lack "
                        f"it ({str(error).split(': ', 1)[-1]})"
                    ) from None
                logger.warning("skipping sample %s of %s: %s", sample.key, url, error)
                continue
            return _Buffered(shard, sample.member, sample.start, sample.end, image, ext, caption)

    def next_sample(self) -> _Buffered:
        """A sample drawn at random from the shuffle buffer, which is first filled to data.shuffle_buffer."""
        while len(self.buffer) < self.plan.buffer:
            self.buffer.append(self._read())
        chosen = int(self.rng.integers(len(self.buffer)))
        self.buffer[chosen], self.buffer[-1] = self.buffer[-1], self.buffer[chosen]
        return self.buffer.pop()


def _fetch_ranges(url: str, ranges: Sequence[tuple[int, int]], options: ReadOptions) -> list[bytes]:
    """The bytes of each [start, end) of shard `url`: ranged reads, in parallel; a pipe: shard (no random access)
    is streamed once, skipping what lies between."""
    if not is_pipe(url):
        with ThreadPoolExecutor(min(_REFETCH_THREADS, len(ranges))) as pool:
            return list(pool.map(lambda r: read_range(url, r[0], r[1] - r[0], options), ranges))
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    found: list[bytes] = [b""] * len(ranges)
    with open_stream(url, ranges[order[0]][0], options) as stream:
        position = ranges[order[0]][0]
        for i in order:
            start, end = ranges[i]
            stream.read(start - position)
            found[i] = stream.read(end - start)
            position = end
    return found


def _refetch(plan: _Plan, refs: list[list[int]]) -> list[_Buffered]:
    """Shuffle-buffer entries saved as [shard, member, start, end], read again by byte range."""
    by_shard: dict[int, list[int]] = {}
    for i, (shard, *_) in enumerate(refs):
        by_shard.setdefault(shard, []).append(i)
    entries: list[_Buffered | None] = [None] * len(refs)
    for shard, indices in by_shard.items():
        url = plan.shards.urls[shard]
        chunks = _fetch_ranges(url, [(refs[i][2], refs[i][3]) for i in indices], plan.options)
        for i, chunk in zip(indices, chunks, strict=True):
            _, member, start, end = refs[i]
            try:
                (sample,) = read_tar_samples(io.BytesIO(chunk), start, member)
                image, ext, caption = parse_sample(sample.key, sample.members, plan.caption_key)
            except (ValueError, tarfile.TarError, BadSample) as error:  # ValueError: not exactly one sample
                raise ValueError(
                    f"{url}: bytes {start}-{end}, a sample the checkpoint's shuffle buffer held, no longer hold it "
                    f"({error}); the shard changed since the checkpoint: restore it, or resume with another "
                    "train.seed to start fresh epochs"
                ) from None
            entries[i] = _Buffered(shard, member, start, end, image, ext, caption)
    return entries


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.stack([row[name] for row in rows])) for name in rows[0]}


def _usable_features(
    dataset: ImageTextDataset, image: bytes, caption: str, key: Sequence[int], sid: int
) -> dict[str, np.ndarray]:
    """Model inputs of one fetched sample, `index` and `sample_id` both its id; raises BadSample if the image does
    not decode."""
    features = dataset.features(decode_image(image), caption, key)
    features["index"] = features["sample_id"] = np.int64(sid)
    return features


class StreamingLoader:
    """Infinite iterator over this data-parallel rank's local batches in the streaming mode (module docstring).

    Batches are dicts as `ImageTextDataset.batch` documents, global_batch_size // dp_size rows, plus `sample_id`
    (B,) int64 (`index` holds the same ids). `state_dict` after k batches holds this rank's reader states as of
    batch k; gather every rank's with `merge_rank_states` for a checkpoint and hand the result to each rank's
    `load_state_dict` before iterating.
    """

    def __init__(
        self, dataset: ImageTextDataset, shards: StreamShards, cfg: Config, dp_rank: int = 0, dp_size: int = 1
    ) -> None:
        if cfg.train.global_batch_size % dp_size:
            raise ValueError(
                f"train.global_batch_size ({cfg.train.global_batch_size}) must split over {dp_size} data-parallel "
                f"ranks; use a multiple of {dp_size}"
            )
        self.dataset = dataset
        self.local_batch_size = cfg.train.global_batch_size // dp_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers = cfg.data.num_workers
        self.streams = cfg.data.streams or max(1, cfg.data.num_workers)
        """Readers on this rank; config validation makes num_workers divide it."""
        self.plan = _Plan.build(shards, cfg, readers=dp_size * self.streams)
        self.seed = cfg.train.seed
        self.step = 0
        """Batches handed out so far."""
        self.skipped_before = 0
        """Bad samples counted by the readers of an earlier layout (a fresh assignment starts their counts at 0)."""
        self.readers = self._fresh_readers(generation=0, epoch=0)

    @property
    def shard_urls(self) -> list[str]:
        """Every training shard URL, in global shard number order (a sample id's high 32 bits index it)."""
        return self.plan.shards.urls

    def _fresh_readers(self, generation: int, epoch: int) -> list[dict[str, Any]]:
        first = self.dp_rank * self.streams
        groups = len(self.plan.groups)
        readers = range(first, first + self.streams)
        return [_fresh_reader_state(self.seed, g, generation, epoch, groups) for g in readers]

    def layout(self) -> dict[str, Any]:
        """What must match for a resume to continue exactly: readers, seed and the shards and how they are drawn."""
        plan = self.plan
        return {
            "dp_size": self.dp_size,
            "streams": self.streams,
            "seed": self.seed,
            "shards": plan.shards.digest(),
            "resampled": plan.resampled,
            "group_p": [float(p) for p in plan.group_p],
        }

    def local_batch(self, reader: _Reader) -> dict[str, torch.Tensor]:
        """The next local batch from `reader` (undecodable images are skipped and counted)."""
        rows: list[dict[str, np.ndarray]] = []
        while len(rows) < self.local_batch_size:
            item = reader.next_sample()
            key = (_SAMPLE_STREAM, self.seed, reader.generation, reader.number, reader.emitted)
            try:
                rows.append(
                    _usable_features(self.dataset, item.image, item.caption, key, sample_id(item.shard, item.member))
                )
            except BadSample as error:
                reader.skipped += 1
                logger.warning("skipping sample %d of %s: %s", item.member, self.shard_urls[item.shard], error)
                continue
            reader.emitted += 1
        return _stack(rows)

    def _batches(self) -> Iterator[tuple[dict[str, torch.Tensor], int, dict[str, Any]]]:
        batches = _ReaderBatches(self, self.step, self.readers)
        if self.num_workers == 0:
            return iter(batches)
        # A generator of its own keeps DataLoader from drawing its worker seeds from the global RNG, which the
        # trainer seeds per step for dropout: starting the workers must not shift the draws of the step it happens in.
        loader = DataLoader(
            batches, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is, generator=torch.Generator()
        )
        return iter(loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch, stream, state in self._batches():
            self.readers[stream] = state
            self.step += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: {"mode": "streaming", "layout", "dp_rank", "step", "skipped" (bad samples
        skipped on this rank), "readers": each reader's state}."""
        skipped = self.skipped_before + sum(r["skipped"] for r in self.readers)
        return {
            "mode": "streaming",
            "layout": self.layout(),
            "dp_rank": self.dp_rank,
            "step": self.step,
            "skipped": skipped,
            "readers": list(self.readers),  # a snapshot: iterating replaces the entries
        }

    def load_state_dict(self, state: dict[str, Any]) -> str | None:
        """Resume from `merge_rank_states` of a run's ranks; call before iterating.

        Same layout: continues exactly, returning None. Otherwise (another dp size, streams, seed, shards or
        weights, or a checkpoint of the indexed mode) every reader starts a fresh epoch, and the returned line
        says so (the trainer prints it on the main rank).
        """
        self.step = int(state["step"])
        if state.get("mode") == "streaming" and state["layout"] == self.layout():
            self.readers = [dict(reader) for reader in state["ranks"][self.dp_rank]]
            self.skipped_before = 0
            return None
        epochs = [deal[0] for rank in state.get("ranks", []) for reader in rank for deal in reader["deals"]]
        epoch = max(epochs, default=-1) + 1
        self.readers = self._fresh_readers(generation=self.step, epoch=epoch)
        self.skipped_before = int(state.get("skipped", 0)) if self.dp_rank == 0 else 0
        if state.get("mode") == "streaming":
            old = state["layout"]
            changed = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in self.layout().items() if old.get(k) != v)
            why = f"the checkpoint's streaming layout differs ({changed})"
        else:
            why = "the checkpoint was written by data.mode=indexed"
        fresh = "freshly seeded shard draws" if self.plan.resampled else f"a fresh shard assignment from epoch {epoch}"
        return (
            f"{why}: continuing at step {self.step} with {fresh}; the old readers' buffered and unread samples are "
            "not replayed (bigmodel data audit shows the difference)"
        )


def merge_rank_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One checkpointable state from every process's `StreamingLoader.state_dict()` (any order; processes of the
    same data-parallel rank hold the same state): {"mode", "layout", "step", "skipped" (all ranks), "ranks":
    reader states by dp rank}."""
    by_rank = {state["dp_rank"]: state for state in states}
    first = by_rank[0]
    ranks = [by_rank[r]["readers"] for r in range(first["layout"]["dp_size"])]
    skipped = sum(state["skipped"] for state in by_rank.values())
    return {"mode": "streaming", "layout": first["layout"], "step": first["step"], "skipped": skipped, "ranks": ranks}


def _as_is(item: Any) -> Any:
    return item


class _ReaderBatches(IterableDataset):
    """Local batches k = start + w, start + w + W, ... of a loader, for worker w of W (0 of 1 in-process), each
    with the number of the reader that built it and that reader's state right after it."""

    def __init__(self, loader: StreamingLoader, start: int, states: list[dict[str, Any]]) -> None:
        self.loader, self.start, self.states = loader, start, states

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], int, dict[str, Any]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        readers: dict[int, _Reader] = {}
        for step in itertools.count(self.start + worker, workers):
            stream = step % self.loader.streams
            if stream not in readers:
                readers[stream] = _Reader(self.loader.plan, self.states[stream])
            reader = readers[stream]
            batch = self.loader.local_batch(reader)
            yield batch, stream, reader.state()


class StreamingEvalLoader:
    """Every sample of the eval shards, read front to back in shard order, in batches of `batch_size` (the last
    may be smaller); bad samples are skipped and counted. Every rank that iterates it gets the whole split.

    MLM masking is keyed by (EVAL_SEED, sample id), so each pass yields the same batches.
    """

    def __init__(self, dataset: ImageTextDataset, shards: StreamShards, batch_size: int, cfg: Config) -> None:
        self.dataset = dataset
        self.shards = shards
        self.batch_size = batch_size
        self.caption_key = cfg.data.caption_key
        self.options = ReadOptions(retries=cfg.data.retries)
        self.skipped = 0
        """Bad samples skipped, summed over all passes."""

    @property
    def shard_urls(self) -> list[str]:
        return self.shards.urls

    def _samples(self, url: str) -> Iterator[TarSample]:
        """The samples of one eval shard, up to any damage (a warning names it)."""
        try:
            yield from shard_samples(url, 0, 0, self.options)
        except tarfile.TarError as error:
            logger.warning("%s: corrupt or truncated tar (%s); skipping the rest", url, error)

    def _features(self, shard: int, sample: TarSample) -> dict[str, np.ndarray] | None:
        try:
            image, _, caption = parse_sample(sample.key, sample.members, self.caption_key)
            key = (_EVAL_SAMPLE_STREAM, EVAL_SEED, sample_id(shard, sample.member))
            return _usable_features(self.dataset, image, caption, key, sample_id(shard, sample.member))
        except BadSample as error:
            self.skipped += 1
            logger.warning("skipping sample %s of %s: %s", sample.key, self.shards.urls[shard], error)
            return None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rows: list[dict[str, np.ndarray]] = []
        for shard, url in enumerate(self.shards.urls):
            for sample in self._samples(url):
                features = self._features(shard, sample)
                if features is not None:
                    rows.append(features)
                if len(rows) == self.batch_size:
                    yield _stack(rows)
                    rows = []
        if rows:
            yield _stack(rows)
