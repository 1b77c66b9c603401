"""Shard indexes: where each sample's members lie inside a tar, so readers fetch them by byte range.

`bigmodel data index PATTERN` writes, per shard `NAME.tar`, the index `NAME.tar.index.json` (member offsets and
sizes grouped by sample key, and the shard's size and etag), and per source pattern one summary
`index-<hash>.json` (every shard's name, sample count, size and etag), beside the shards or into one folder
(data.index_dir). Start-up reads one summary per source; a shard's index is read when a process first opens the
shard, and then the shard's current size and etag are compared with the index (one stat or HEAD request).
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from bigmodel.data.locations import (
    DEFAULT_OPTIONS,
    LocationNotFound,
    ReadOptions,
    ShardInfo,
    expand_source,
    is_local,
    join,
    local_path,
    open_stream,
    parent,
    read_bytes,
    shard_info,
    write_bytes,
)

INDEX_SUFFIX = ".index.json"
"""Appended to a shard's file name to name its index."""
_INDEX_FORMAT, _SUMMARY_FORMAT, _VERSION = "bigmodel.shard_index", "bigmodel.source_index", 1
# webdataset's own rule (webdataset.tariterators.base_plus_ext): the key keeps the directories and the basename up
# to its first dot; everything after that dot is the member's extension.
MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
"""Splits a tar member name into (sample key, extension) as webdataset does."""


@dataclass
class ShardIndex:
    """The members of one shard grouped by sample key (in tar order), and the shard version they describe."""

    name: str
    """The shard's file name."""
    info: ShardInfo
    keys: list[str]
    extensions: list[str]
    """Member extensions (lowercase), the columns of `spans`."""
    spans: np.ndarray
    """(samples, extensions, 2) int64: each member's data offset and size in the tar; -1 where a sample lacks one."""

    def __len__(self) -> int:
        return len(self.keys)

    def members(self, sample: int) -> dict[str, tuple[int, int]]:
        """{extension: (offset, size)} of the members of `sample`."""
        return {
            ext: (int(o), int(s)) for ext, (o, s) in zip(self.extensions, self.spans[sample], strict=True) if s >= 0
        }

    def to_json(self) -> bytes:
        """The index file's contents."""
        record = {
            "format": _INDEX_FORMAT,
            "version": _VERSION,
            "shard": self.name,
            "size": self.info.size,
            "etag": self.info.etag,
            "keys": self.keys,
            "extensions": self.extensions,
            "spans": self.spans.reshape(-1).tolist(),
        }
        return json.dumps(record, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, url: str) -> ShardIndex:
        """Parse an index file read from `url`; ValueError naming it if it is not one."""
        record = _parse_record(data, url, _INDEX_FORMAT)
        spans = np.asarray(record["spans"], dtype=np.int64).reshape(len(record["keys"]), len(record["extensions"]), 2)
        info = ShardInfo(int(record["size"]), str(record["etag"]))
        return cls(record["shard"], info, list(record["keys"]), list(record["extensions"]), spans)


@dataclass(frozen=True)
class ShardEntry:
    """One shard as a source's summary lists it."""

    name: str
    samples: int
    info: ShardInfo


def basename(url: str) -> str:
    """The file name at the end of a URL or path."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def index_url(shard_url: str, index_dir: str = "") -> str:
    """Where the index of `shard_url` is: in `index_dir` if given, else beside the shard."""
    return join(index_dir or parent(shard_url), basename(shard_url) + INDEX_SUFFIX)


def summary_url(pattern: str, index_dir: str = "") -> str | None:
    """Where the summary of the source `pattern` is (keyed by the pattern's file-name part, so a folder can
    move); None when it has no fixed folder (braces before the file name) and no `index_dir` is given."""
    folder = index_dir or parent(pattern)
    if not index_dir and "{" in folder:
        return None
    digest = hashlib.sha256(basename(pattern).encode("utf-8")).hexdigest()[:16]
    return join(folder, f"index-{digest}.json")


def scan_shard(url: str, options: ReadOptions = DEFAULT_OPTIONS) -> ShardIndex:
    """Index one shard by reading its tar headers: seeking through a local file, one sequential read remotely.

    ValueError naming the shard if it is not an uncompressed tar. A truncated tar keeps the members whose
    headers were read; a member cut short is reported as a bad sample when read.
    """
    info = shard_info(url, options)
    members: dict[str, dict[str, tuple[int, int]]] = {}
    stream = open(local_path(url), "rb") if is_local(url) else open_stream(url, 0, options)  # noqa: SIM115
    try:
        with tarfile.open(fileobj=stream, mode="r:" if is_local(url) else "r|") as tar:
            for member in tar:
                match = MEMBER_NAME.match(member.name)
                if member.isfile() and match:
                    members.setdefault(match.group(1), {})[match.group(2).lower()] = (member.offset_data, member.size)
    except tarfile.ReadError as error:
        if not members:
            raise ValueError(f"shard {url} is not an uncompressed tar file ({error})") from None
    finally:
        stream.close()
    extensions = sorted({ext for by_ext in members.values() for ext in by_ext})
    spans = np.full((len(members), len(extensions), 2), -1, dtype=np.int64)
    for row, by_ext in enumerate(members.values()):
        for ext, span in by_ext.items():
            spans[row, extensions.index(ext)] = span
    return ShardIndex(basename(url), info, list(members), extensions, spans)


def read_index(shard_url: str, index_dir: str = "", options: ReadOptions = DEFAULT_OPTIONS) -> ShardIndex | None:
    """The index of `shard_url`, or None if it has none."""
    url = index_url(shard_url, index_dir)
    try:
        return ShardIndex.from_json(read_bytes(url, options), url)
    except LocationNotFound:
        return None


def read_summary(pattern: str, index_dir: str = "", options: ReadOptions = DEFAULT_OPTIONS) -> list[ShardEntry] | None:
    """The shards the summary of `pattern` lists, or None if there is no summary."""
    url = summary_url(pattern, index_dir)
    if url is None:
        return None
    try:
        record = _parse_record(read_bytes(url, options), url, _SUMMARY_FORMAT)
    except LocationNotFound:
        return None
    return [
        ShardEntry(s["name"], int(s["samples"]), ShardInfo(int(s["size"]), str(s["etag"]))) for s in record["shards"]
    ]


def write_indexes(pattern: str, out_dir: str = "", options: ReadOptions = DEFAULT_OPTIONS, jobs: int = 8) -> dict:
    """Index every shard of the source `pattern` (`jobs` at a time) and write the indexes and the summary.

    They go beside the shards, or into `out_dir` (local or remote; point data.index_dir at it). Returns
    {"shards", "samples", "summary"}: counts and the summary's URL.
    """
    urls = expand_source(pattern)
    summary = _writable_summary_url(pattern, out_dir)

    def index_one(url: str) -> ShardIndex:
        index = scan_shard(url, options)
        write_bytes(index_url(url, out_dir), index.to_json(), options)
        return index

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        entries = [ShardEntry(i.name, len(i), i.info) for i in pool.map(index_one, urls)]
    write_summary(pattern, entries, out_dir, options)
    return {"shards": len(entries), "samples": sum(e.samples for e in entries), "summary": summary}


def write_summary(
    pattern: str, entries: list[ShardEntry], out_dir: str = "", options: ReadOptions = DEFAULT_OPTIONS
) -> None:
    """Write the summary of the source `pattern` listing `entries` (its shards in pattern order)."""
    url = _writable_summary_url(pattern, out_dir)
    shards = [{"name": e.name, "samples": e.samples, "size": e.info.size, "etag": e.info.etag} for e in entries]
    record = {"format": _SUMMARY_FORMAT, "version": _VERSION, "pattern": basename(pattern), "shards": shards}
    write_bytes(url, json.dumps(record, indent=1).encode("utf-8"), options)


def _writable_summary_url(pattern: str, out_dir: str) -> str:
    url = summary_url(pattern, out_dir)
    if url is None:
        raise ValueError(f"{pattern}: braces in the folder part; give --out DIR (and data.index_dir: DIR)")
    return url


def _parse_record(data: bytes, url: str, expected_format: str) -> dict:
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict) or record.get("format") != expected_format or record.get("version") != _VERSION:
        raise ValueError(f"{url} is not a {expected_format} file of version {_VERSION}; re-run `bigmodel data index`")
    return record
