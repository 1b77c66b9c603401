"""Where shards live: local paths, s3://, http(s):// and pipe:COMMAND, as WebDataset and fsspec name them.

A data spec is one or more sources joined by `::` (OpenCLIP's convention); each source is a brace pattern
(`s3://bucket/train-{000000..009999}.tar`) that expands to shard URLs. Every read goes through the three functions
below, so the readers above never care where a shard is.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
from braceexpand import braceexpand

SOURCE_SEPARATOR = "::"


@dataclass(frozen=True)
class ShardInfo:
    """What identifies one version of a shard: its size in bytes and its etag (or mtime for local files)."""

    size: int
    etag: str


def split_sources(spec: str) -> list[str]:
    """The `::`-joined source patterns of a data spec, stripped; ValueError for an empty one."""
    sources = [part.strip() for part in spec.split(SOURCE_SEPARATOR)]
    if not spec.strip() or any(not source for source in sources):
        raise ValueError(f"shard spec {spec!r} has an empty source; join patterns with '::', e.g. a.tar::b.tar")
    return sources


def expand_source(pattern: str) -> list[str]:
    """The shard URLs (or local paths) a brace pattern names, in order."""
    return list(braceexpand(pattern))


def is_local(url: str) -> bool:
    """Whether `url` is a path on a local file system (no scheme, or file://)."""
    return ("://" not in url and not url.startswith("pipe:")) or url.startswith("file://")


def open_stream(url: str, offset: int = 0) -> BinaryIO:
    """A file object reading the shard `url` sequentially from byte `offset` (pipe: runs the command and skips
    `offset` bytes of its output)."""
    if url.startswith("pipe:"):
        process = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE)
        while offset > 0:
            offset -= len(process.stdout.read(min(offset, 1 << 20)) or b"\0" * offset)
        return process.stdout
    file = fsspec.open(url, "rb").open()
    file.seek(offset)
    return file


def read_range(url: str, offset: int, size: int) -> bytes:
    """`size` bytes of the shard `url` from byte `offset` (a ranged GET for remote shards)."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs.cat_file(path, start=offset, end=offset + size)


def shard_info(url: str) -> ShardInfo:
    """The size and version tag of the shard `url`."""
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    etag = info.get("ETag") or info.get("etag") or str(info.get("mtime", ""))
    return ShardInfo(int(info["size"]), str(etag).strip('"'))
