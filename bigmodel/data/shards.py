"""WebDataset tar shards: the on-disk format of image-text pairs, as webdataset and img2dataset write them.

A sample is a group of tar members sharing a key (the member name up to the first dot of its basename, as in
webdataset): one image (`KEY.png`, `KEY.jpg`, also jpeg or webp), its caption (`KEY.txt`, UTF-8) and optionally
img2dataset's metadata (`KEY.json`; its `status` must be "success" if present, and data.caption_key may name one
of its fields instead of txt). Shards are written with `webdataset.ShardWriter` and read with random access by
byte ranges through per-shard indexes (bigmodel.data.index), so that any rank can fetch any sample of the global
stream, wherever the shards are stored, without streaming through them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import webdataset
from PIL import Image

from bigmodel.data.index import (
    ShardEntry,
    ShardIndex,
    basename,
    index_url,
    read_index,
    read_summary,
    scan_shard,
)
from bigmodel.data.ledger import sample_id
from bigmodel.data.locations import (
    DEFAULT_OPTIONS,
    ReadOptions,
    expand_source,
    is_local,
    is_pipe,
    read_range,
    shard_info,
    split_sources,
)
from bigmodel.data.shapes import render_shapes

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
"""Image member extensions the reader accepts (lowercase)."""
PACK_SEED = 0
"""Seed of the train/eval split drawn by `pack_pairs`; fixed so repacking the same pairs gives the same split."""
_MAX_TABLES = 1024
"""Shard indexes a process keeps in memory (least recently used dropped first)."""
_INDEX_READERS = 16
"""Shard indexes read at once at start-up when a source has no summary."""
_PREFETCH_READERS = 16
"""Remote samples of a batch fetched at once by `IndexedShards.prefetch` (ranged GETs are latency-bound)."""
_CAPTION_KEY_PROBE = 16
"""With a JSON caption key, start-up checks that one of the first this many samples of the first shard has it."""
_COALESCE_SLACK = 4096
"""A sample's members are fetched in one ranged read when the gaps between them (tar headers) total at most this."""


class BadSample(Exception):
    """A sample that cannot be used: missing image or caption, undecodable image or empty caption."""


class FailedSample(BadSample):
    """A sample whose img2dataset metadata says it was not downloaded (a `status` other than "success")."""


class MissingCaptionKey(BadSample):
    """A sample whose JSON metadata lacks the field data.caption_key names."""


def decode_image(data: bytes) -> np.ndarray:
    """Decode image file bytes to an (H, W, 3) uint8 RGB array; raises BadSample if they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    # PIL signals corrupt or truncated data with any of these, depending on where decoding stops.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadSample(f"undecodable image ({error})") from None


def parse_sample(key: str, members: dict[str, bytes], caption_key: str = "txt") -> tuple[bytes, str, str]:
    """(image bytes, image extension, caption) of one sample from its members ({lowercase extension: bytes}).

    The one rule both read modes use. Raises FailedSample if KEY.json has a `status` other than "success",
    MissingCaptionKey if `caption_key` (txt or a KEY.json field) is absent, and BadSample for no image or an empty
    or non-UTF-8 caption.
    """
    metadata = _metadata(key, members, required=False)
    caption = parse_caption(key, members, caption_key, metadata)
    ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if ext is None:
        raise BadSample(f"sample {key} has no image ({', '.join(IMAGE_EXTENSIONS)})")
    return members[ext], ext, caption


def parse_caption(key: str, members: dict[str, bytes], caption_key: str, metadata: dict | None = None) -> str:
    """The stripped caption of one sample (KEY.txt or a KEY.json field); raises BadSample as `parse_sample` does."""
    metadata = metadata if metadata is not None else _metadata(key, members, required=caption_key != "txt")
    if metadata is not None and metadata.get("status", "success") != "success":
        raise FailedSample(f"sample {key}: img2dataset status {metadata['status']!r}")
    if caption_key == "txt":
        if "txt" not in members:
            raise BadSample(f"sample {key} has no caption ({key}.txt)")
        try:
            caption = members["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample(f"sample {key}: caption is not UTF-8") from None
    else:
        if caption_key not in metadata:
            raise MissingCaptionKey(
                f"sample {key}: {key}.json has no field {caption_key!r} (fields: {', '.join(sorted(metadata))}); "
                "set data.caption_key to one of them or to txt"
            )
        caption = metadata[caption_key]
        if not isinstance(caption, str):
            raise BadSample(f"sample {key}: {key}.json field {caption_key!r} is not a string")
    if not caption.strip():
        raise BadSample(f"sample {key}: empty caption")
    return caption.strip()


def _metadata(key: str, members: dict[str, bytes], required: bool) -> dict | None:
    if "json" not in members:
        if required:
            raise MissingCaptionKey(
                f"sample {key} has no {key}.json to read the caption from; set data.caption_key: txt"
            )
        return None
    try:
        metadata = json.loads(members["json"])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadSample(f"sample {key}: {key}.json is not valid JSON") from None
    if not isinstance(metadata, dict):
        raise BadSample(f"sample {key}: {key}.json is not a JSON object")
    return metadata


class IndexedShards:
    """Random access to the samples of `::`-joined shard sources, numbered source by source in spec order, then
    shard by shard, then in tar order; members are read by byte ranges wherever the shards are stored.

    Start-up reads each source's index summary (or, without one, each shard's index); local shards without an
    index are scanned as before. A shard's index is loaded, and its size and etag checked against the shard, when
    a process first reads from it. Instances are picklable for DataLoader workers; loaded indexes are per process.
    """

    def __init__(
        self, spec: str, index_dir: str = "", options: ReadOptions = DEFAULT_OPTIONS, caption_key: str = "txt"
    ) -> None:
        self.spec, self.index_dir, self.options, self.caption_key = spec, index_dir, options, caption_key
        self.shard_urls: list[str] = []
        """Every shard's URL, in global shard-number order (the shard number is sample_id >> 32)."""
        self._expected: list[ShardEntry | None] = []  # per shard: what the summary says, None if scanned here
        self._scanned: dict[int, ShardIndex] = {}  # local shards without an index, scanned at start-up
        self._source_of: list[str] = []
        for source in split_sources(spec):
            self._add_source(source)
        counts = [len(self._scanned[s]) if e is None else e.samples for s, e in enumerate(self._expected)]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        if self._starts[-1] == 0:
            raise ValueError(f"shard spec {spec}: the shards hold no samples")
        self._loaded: OrderedDict[int, ShardIndex] = OrderedDict()
        self._pid = os.getpid()
        self._prefetched: dict[int, tuple[str, dict[str, bytes]]] = {}
        self._remote = not all(is_local(url) for url in self.shard_urls)
        if caption_key != "txt":
            self._check_caption_key()

    def _add_source(self, source: str) -> None:
        if is_pipe(source):
            raise ValueError(f"{source}: a pipe: source can only be streamed; set data.mode=streaming")
        urls = expand_source(source)
        summary = read_summary(source, self.index_dir, self.options)
        if summary is not None and [entry.name for entry in summary] == [basename(url) for url in urls]:
            entries: list[ShardEntry | None] = list(summary)
        else:
            with ThreadPoolExecutor(max_workers=_INDEX_READERS) as pool:
                indexes = list(pool.map(lambda url: read_index(url, self.index_dir, self.options), urls))
            entries = [
                self._entry_without_summary(source, url, index) for url, index in zip(urls, indexes, strict=True)
            ]
        for url, entry in zip(urls, entries, strict=True):
            if entry is None:
                self._scanned[len(self.shard_urls)] = scan_shard(url, self.options)
            self.shard_urls.append(url)
            self._source_of.append(source)
            self._expected.append(entry)

    def _entry_without_summary(self, source: str, url: str, index: ShardIndex | None) -> ShardEntry | None:
        """The summary entry `index` stands for; None for a local shard without one (scanned instead)."""
        if index is not None:
            return ShardEntry(index.name, len(index), index.info)
        if not is_local(url):
            raise ValueError(
                f"{url} has no index ({index_url(url, self.index_dir)}); run `bigmodel data index {source}` "
                "(add --out DIR and set data.index_dir: DIR to keep indexes elsewhere) or set data.mode=streaming"
            )
        return None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_loaded"], state["_prefetched"] = OrderedDict(), {}
        return state

    def locate(self, index: int) -> tuple[int, int]:
        """(global shard number, member number within the shard) of sample `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    def sample_id(self, index: int) -> int:
        """(global shard number << 32) | member number: names sample `index` together with `shard_urls`."""
        return sample_id(*self.locate(index))

    def _table(self, shard: int) -> ShardIndex:
        if shard in self._scanned:
            return self._scanned[shard]
        if self._pid != os.getpid():  # a forked worker starts with its own cache
            self._loaded, self._pid = OrderedDict(), os.getpid()
        if shard in self._loaded:
            self._loaded.move_to_end(shard)
            return self._loaded[shard]
        table = self._load_checked(shard)
        if len(self._loaded) >= _MAX_TABLES:
            self._loaded.popitem(last=False)
        self._loaded[shard] = table
        return table

    def _load_checked(self, shard: int) -> ShardIndex:
        """The index of `shard`, after checking it still describes the shard (the summary too)."""
        url, expected = self.shard_urls[shard], self._expected[shard]
        table = read_index(url, self.index_dir, self.options)
        fix = f"re-run `bigmodel data index {self._source_of[shard]}`"
        if table is None:
            raise ValueError(f"{url}: its index {index_url(url, self.index_dir)} is missing; {fix}")
        current = shard_info(url, self.options)
        if table.info != current or (expected.samples, expected.info) != (len(table), table.info):
            raise ValueError(
                f"{url} no longer matches its index (shard: size {current.size}, etag {current.etag}; index: size "
                f"{table.info.size}, etag {table.info.etag}, {len(table)} samples; summary: {expected.samples}); {fix}"
            )
        return table

    def _spans(self, index: int, images: bool) -> tuple[str, str, dict[str, tuple[int, int]]]:
        """The shard URL, key and member spans ({extension: (offset, size)}) of sample `index`; raises BadSample for
        a member cut off by a truncated shard."""
        shard, member = self.locate(index)
        table = self._table(shard)
        key, url = table.keys[member], self.shard_urls[shard]
        spans = {ext: span for ext, span in table.members(member).items() if images or ext not in IMAGE_EXTENSIONS}
        if any(offset + size > table.info.size for offset, size in spans.values()):
            raise BadSample(f"{url}: sample {key} is cut off (truncated tar)")
        return url, key, spans

    def _fetch(self, url: str, spans: dict[str, tuple[int, int]]) -> dict[str, bytes]:
        """The members `spans` of the shard `url`, in one ranged read when they are adjacent."""
        if not spans:
            return {}
        start = min(offset for offset, _ in spans.values())
        end = max(offset + size for offset, size in spans.values())
        if end - start <= sum(size for _, size in spans.values()) + _COALESCE_SLACK:
            block = read_range(url, start, end - start, self.options)
            return {ext: block[offset - start : offset - start + size] for ext, (offset, size) in spans.items()}
        return {ext: read_range(url, offset, size, self.options) for ext, (offset, size) in spans.items()}

    def members(self, index: int, images: bool = True) -> tuple[str, dict[str, bytes]]:
        """The key and members ({extension: bytes}) of sample `index` (`images=False` leaves out image members);
        raises BadSample for a member cut off by a truncated shard."""
        if images and index in self._prefetched:
            return self._prefetched.pop(index)
        url, key, spans = self._spans(index, images)
        return key, self._fetch(url, spans)

    def prefetch(self, indices: Sequence[int]) -> None:
        """Fetch the members of `indices` from remote shards concurrently, for the `load` calls that follow (one
        batch's worth: what an earlier call fetched and nobody read is dropped). Local shards are read on demand."""
        self._prefetched = {}
        if not self._remote:
            return
        wanted = {}
        for index in indices:
            try:
                wanted[index] = self._spans(index, images=True)  # indexes load here, in this thread
            except BadSample:
                continue  # reported again by `load`
        with ThreadPoolExecutor(max_workers=_PREFETCH_READERS) as pool:
            fetched = pool.map(lambda item: self._fetch(item[0], item[2]), wanted.values())
            for (index, (_, key, _)), members in zip(wanted.items(), fetched, strict=True):
                self._prefetched[index] = (key, members)

    def _describe(self, index: int, error: BadSample) -> BadSample:
        """`error` again, with the shard's URL in front (its class kept, so counts by kind still work)."""
        return type(error)(f"{self.shard_urls[self.locate(index)[0]]}: {error}")

    def caption(self, index: int) -> str:
        """The caption of sample `index`, stripped; raises BadSample if missing, not UTF-8 or empty."""
        key, members = self.members(index, images=False)
        try:
            return parse_caption(key, members, self.caption_key)
        except BadSample as error:
            raise self._describe(index, error) from None

    def raw(self, index: int) -> tuple[bytes, str, str]:
        """Image bytes, image extension and caption of sample `index`; raises BadSample as `parse_sample` does."""
        key, members = self.members(index)
        try:
            return parse_sample(key, members, self.caption_key)
        except BadSample as error:
            raise self._describe(index, error) from None

    def load(self, index: int) -> tuple[np.ndarray, str]:
        """The decoded (H, W, 3) uint8 image and caption of sample `index`; raises BadSample if unusable."""
        image, _, caption = self.raw(index)
        return decode_image(image), caption

    def captions(self) -> Iterator[str]:
        """Every usable caption, in sample order (for training a tokenizer)."""
        for index in range(len(self)):
            try:
                yield self.caption(index)
            except BadSample:
                continue

    def _check_caption_key(self) -> None:
        """One-line ValueError if none of the first samples of the first shard has the JSON caption key."""
        probed = range(min(_CAPTION_KEY_PROBE, int(self._starts[1])))
        errors = []
        for index in probed:
            try:
                self.caption(index)
                return
            except MissingCaptionKey as error:
                errors.append(error)
            except BadSample:
                continue
        if errors:
            raise ValueError(
                f"data.caption_key {self.caption_key!r}: none of the first {len(probed)} samples of "
                f"{self.shard_urls[0]} has it ({str(errors[0]).split(': ', 1)[-1]})"
            )


def write_shards(samples: Iterable[tuple[bytes, str, str]], out_dir: str | Path, prefix: str, per_shard: int) -> str:
    """Write (image bytes, image extension, caption) samples to out_dir/prefix-NNNNNN.tar; return their pattern.

    Returns "" (and leaves no file) when `samples` is empty. Keys are the sample numbers, so a sample's index in
    `IndexedShards` equals its position in `samples`. Member times are fixed, so equal samples give equal bytes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    count = 0
    writer_pattern = str(out_dir / f"{prefix}-%06d.tar")
    with webdataset.ShardWriter(
        writer_pattern, maxcount=per_shard, verbose=0, post=written.append, encoder=False, mtime=0
    ) as writer:
        for count, (image, ext, caption) in enumerate(samples, start=1):
            writer.write({"__key__": f"{count - 1:09d}", ext: image, "txt": caption.encode("utf-8")})
    if count == 0:  # ShardWriter opens its first shard before any sample arrives
        for path in written:
            os.remove(path)
        return ""
    last = len(written) - 1
    return str(out_dir / (f"{prefix}-{last:06d}.tar" if last == 0 else f"{prefix}-{{000000..{last:06d}}}.tar"))


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _shapes_samples(split: str, size: int, image_size: int, max_shapes: int) -> Iterator[tuple[bytes, str, str]]:
    for index in range(size):
        image, caption = render_shapes(split, index, image_size, max_shapes)
        yield _png_bytes(image), "png", caption


def _write_description(out_dir: Path, description: dict) -> None:
    (out_dir / "dataset.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")


def write_shapes_shards(
    out_dir: str | Path,
    train_size: int,
    eval_size: int,
    image_size: int = 32,
    max_shapes: int = 2,
    samples_per_shard: int = 10_000,
) -> dict:
    """Write the embedded shapes dataset as PNG shards train-NNNNNN.tar and eval-NNNNNN.tar under `out_dir`.

    Sample i of each split's shards is exactly `render_shapes(split, i, image_size, max_shapes)`. Returns (and
    writes to out_dir/dataset.json) the counts and the brace patterns for data.train_shards / data.eval_shards.
    """
    out_dir = Path(out_dir)
    description = {
        "source": "shapes",
        "train_shards": write_shards(
            _shapes_samples("train", train_size, image_size, max_shapes), out_dir, "train", samples_per_shard
        ),
        "eval_shards": write_shards(
            _shapes_samples("eval", eval_size, image_size, max_shapes), out_dir, "eval", samples_per_shard
        ),
        "train_size": train_size,
        "eval_size": eval_size,
        "image_size": image_size,
        "max_shapes": max_shapes,
    }
    _write_description(out_dir, description)
    return description


def _image_extension(path: Path) -> str | None:
    ext = path.suffix.lower().lstrip(".")
    return ("jpg" if ext == "jpeg" else ext) if ext in IMAGE_EXTENSIONS else None


def _folder_pairs(folder: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """(image, caption) pairs of a folder of images with same-stem .txt captions, and the problems found."""
    images: dict[Path, Path] = {}
    problems = []
    for path in sorted(folder.rglob("*")):
        if _image_extension(path) and path.is_file():
            if path.with_suffix("") in images:
                problems.append(f"{path}: another image has the same name, {images[path.with_suffix('')]} is used")
            else:
                images[path.with_suffix("")] = path
    captions = {path.with_suffix(""): path for path in sorted(folder.rglob("*.txt"))}
    pairs = []
    for stem in sorted(images.keys() | captions.keys()):
        if stem not in images:
            problems.append(f"{captions[stem]}: no image with the same name")
        elif stem not in captions:
            problems.append(f"{images[stem]}: no caption file {stem.name}.txt")
        else:
            pairs.append((images[stem], captions[stem].read_text(encoding="utf-8")))
    return pairs, problems


def _csv_pairs(csv_path: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """(image, caption) pairs of a CSV with columns image,caption (paths relative to the CSV), and problems."""
    pairs, problems = [], []
    with open(csv_path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if not {"image", "caption"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{csv_path}: needs a header with columns image,caption, found {reader.fieldnames}")
        for row in reader:
            image = csv_path.parent / row["image"]
            if not image.is_file():
                problems.append(f"{csv_path}:{reader.line_num}: image {image} not found")
            elif not _image_extension(image):
                problems.append(f"{csv_path}:{reader.line_num}: {image} is not one of {', '.join(IMAGE_EXTENSIONS)}")
            else:
                pairs.append((image, row["caption"] or ""))
    return pairs, problems


def pack_pairs(
    src: str | Path, out_dir: str | Path, samples_per_shard: int = 10_000, eval_fraction: float = 0.0
) -> dict:
    """Pack image-caption pairs into shards train-NNNNNN.tar and eval-NNNNNN.tar under `out_dir`.

    `src` is a folder of images (png, jpg, jpeg, webp; searched recursively) each with a same-stem .txt caption,
    or a CSV file with columns image,caption whose image paths are relative to the CSV. Image bytes are stored
    as they are (not re-encoded). Pairs with a missing image, a missing caption or an empty caption are skipped
    and listed under "skipped" in the result. A fixed-seed draw puts ceil(eval_fraction * pairs) of them (but
    never all) in the eval split. Returns the description also written to out_dir/dataset.json.
    """
    src = Path(src)
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if src.is_dir():
        pairs, problems = _folder_pairs(src)
    elif src.is_file() and src.suffix.lower() == ".csv":
        pairs, problems = _csv_pairs(src)
    else:
        raise ValueError(f"{src}: expected a folder of images with .txt captions or a .csv file with image,caption")
    usable = [(image, caption.strip()) for image, caption in pairs if caption.strip()]
    problems += [f"{image}: empty caption" for image, caption in pairs if not caption.strip()]
    if not usable:
        raise ValueError(f"{src}: no usable image-caption pairs ({len(problems)} skipped)")
    eval_count = min(len(usable) - 1, math.ceil(len(usable) * eval_fraction))
    is_eval = np.zeros(len(usable), dtype=bool)
    is_eval[np.random.default_rng(PACK_SEED).permutation(len(usable))[:eval_count]] = True

    def samples(split_is_eval: bool) -> Iterator[tuple[bytes, str, str]]:
        for (image, caption), in_eval in zip(usable, is_eval, strict=True):
            if in_eval == split_is_eval:
                yield image.read_bytes(), _image_extension(image), caption

    out_dir = Path(out_dir)
    description = {
        "source": str(src),
        "train_shards": write_shards(samples(False), out_dir, "train", samples_per_shard),
        "eval_shards": write_shards(samples(True), out_dir, "eval", samples_per_shard),
        "train_size": len(usable) - eval_count,
        "eval_size": eval_count,
    }
    _write_description(out_dir, description)
    return {**description, "skipped": problems}
