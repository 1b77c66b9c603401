"""Where shards live: local paths, s3://, http(s):// and pipe:COMMAND, as WebDataset and fsspec name them.

A data spec is one or more sources joined by `::` (OpenCLIP's convention); each source is a brace pattern
(`s3://bucket/train-{000000..009999}.tar`) that expands to shard URLs. Every read and write of data goes through
the functions below, so the readers above never care where a shard is.

S3 goes through s3fs with the endpoint and credentials of the standard AWS environment and files
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `~/.aws/config`, `~/.aws/credentials`), so
MinIO, Ceph and R2 work as AWS does; http(s) goes through fsspec's HTTP file system. Transient failures
(connection errors, timeouts, 5xx, throttling) are retried `ReadOptions.retries` times with exponential backoff;
anything else, or a failure that outlasts the retries, is a `LocationError`: one line naming the URL, the status
and the fix.
"""

from __future__ import annotations

import io
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import BinaryIO, TypeVar

import fsspec
from braceexpand import braceexpand

SOURCE_SEPARATOR = "::"
_MAX_BACKOFF_S = 30.0
_TRANSIENT_STATUSES = {408, 429, 500, 502, 503, 504}
_TRANSIENT_S3_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError"}
_FORBIDDEN_S3_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
_S3_CREDENTIALS_FIX = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws/credentials"

T = TypeVar("T")


class LocationError(ValueError):
    """A URL that cannot be read or written; the message is one line naming the URL, the status and the fix."""


class LocationNotFound(LocationError):
    """The URL names nothing: a missing file or object (404, NoSuchKey); a missing bucket is a LocationError."""


@dataclass(frozen=True)
class ReadOptions:
    """How remote reads react to transient failures (data.retries)."""

    retries: int = 5
    """Attempts after the first."""
    backoff_s: float = 0.5
    """Wait before the first retry; doubled for each further one (capped at 30 s)."""


DEFAULT_OPTIONS = ReadOptions()
"""data.retries' default: 5 retries, the first after 0.5 s."""


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
    """The shard URLs (or local paths) a brace pattern names, in order.

    Local patterns are checked file by file (FileNotFoundError naming how many are missing and the first);
    remote ones are not (there may be 10^5), so a missing remote shard surfaces on its first read.
    """
    if not pattern.strip():
        raise ValueError("empty shard pattern; give a path such as data/train-{000000..000009}.tar")
    if is_pipe(pattern):
        return [pattern]  # the command is the shell's; braces in it are shell syntax
    urls = list(braceexpand(pattern))
    if is_local(pattern):
        missing = [url for url in urls if not os.path.isfile(local_path(url))]
        if missing:
            raise FileNotFoundError(
                f"shard pattern {pattern}: {len(missing)} of {len(urls)} files missing (first: {missing[0]})"
            )
    return urls


def is_pipe(url: str) -> bool:
    """Whether `url` is WebDataset's pipe:COMMAND (the shard is the command's standard output)."""
    return url.startswith("pipe:")


def is_local(url: str) -> bool:
    """Whether `url` is a path on a local file system (no scheme, or file://)."""
    return ("://" not in url and not is_pipe(url)) or url.startswith("file://")


def local_path(url: str) -> str:
    """The file system path of a local `url` (file:// stripped)."""
    return url[len("file://") :] if url.startswith("file://") else url


def join(base: str, name: str) -> str:
    """`name` inside the folder (local or remote) `base`."""
    return f"{base.rstrip('/')}/{name}" if base else name


def parent(url: str) -> str:
    """The folder holding `url` ("" for a bare local file name)."""
    return url.rsplit("/", 1)[0] if "/" in url else ""


def open_stream(url: str, offset: int = 0, options: ReadOptions = DEFAULT_OPTIONS) -> BinaryIO:
    """A file object reading the shard `url` sequentially from byte `offset`.

    A remote stream that fails mid-read reopens at the byte it reached (with the retries of `options`); pipe:
    runs the command and skips `offset` bytes of its output.
    """
    if is_pipe(url):
        process = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE)
        while offset > 0:
            offset -= len(process.stdout.read(min(offset, 1 << 20)) or b"\0" * offset)
        return process.stdout
    if is_local(url):
        file = open(local_path(url), "rb")  # noqa: SIM115 (the caller closes it)
        file.seek(offset)
        return file
    return io.BufferedReader(_ResumingStream(url, offset, options), buffer_size=1 << 20)


def read_range(url: str, offset: int, size: int, options: ReadOptions = DEFAULT_OPTIONS) -> bytes:
    """`size` bytes of the shard `url` from byte `offset` (a ranged GET for remote shards)."""
    _check_random_access(url)
    if is_local(url):
        with open(local_path(url), "rb") as file:
            file.seek(offset)
            return file.read(size)
    fs, path = _filesystem(url)
    return _with_retries(url, options, lambda: fs.cat_file(path, start=offset, end=offset + size))


def read_bytes(url: str, options: ReadOptions = DEFAULT_OPTIONS) -> bytes:
    """The whole (small) file `url`; LocationNotFound if there is none."""
    _check_random_access(url)
    fs, path = _filesystem(url)
    return _with_retries(url, options, lambda: fs.cat_file(path))


def write_bytes(url: str, data: bytes, options: ReadOptions = DEFAULT_OPTIONS) -> None:
    """Write `data` as the file `url` (a local file's folder is created), replacing what was there."""
    _check_random_access(url)
    fs, path = _filesystem(url)
    if is_local(url):
        fs.makedirs(parent(path) or ".", exist_ok=True)
    _with_retries(url, options, lambda: fs.pipe_file(path, data))


def shard_info(url: str, options: ReadOptions = DEFAULT_OPTIONS) -> ShardInfo:
    """The size and version tag of the shard `url` (ETag for S3 and HTTP servers that send one, else
    Last-Modified; mtime for local files)."""
    _check_random_access(url)
    fs, path = _filesystem(url)
    info = _with_retries(url, options, lambda: fs.info(path))
    etag = next((info[key] for key in ("ETag", "etag", "Last-Modified", "mtime") if info.get(key)), "")
    return ShardInfo(int(info["size"]), str(etag).strip('"'))


def _check_random_access(url: str) -> None:
    if is_pipe(url):
        raise ValueError(f"{url}: a pipe: source can only be streamed; use data.mode=streaming")


_AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@lru_cache(maxsize=8)
def _s3_filesystem(pid: int, environment: tuple[str | None, ...]) -> fsspec.AbstractFileSystem:
    """One S3 file system per process and AWS environment (the arguments only key the cache: a forked worker or a
    changed environment gets a client of its own), with s3fs's and botocore's own retries cut to one attempt so
    that data.retries alone decides how often a request is repeated."""
    import s3fs  # the remote extra

    single_attempt = type("SingleAttemptS3FileSystem", (s3fs.S3FileSystem,), {"retries": 1})
    return single_attempt(skip_instance_cache=True, config_kwargs={"retries": {"total_max_attempts": 1}})


def _filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    if url.startswith("s3://"):
        environment = tuple(os.environ.get(name) for name in _AWS_VARIABLES)
        return _s3_filesystem(os.getpid(), environment), url[len("s3://") :]
    if is_local(url):
        return fsspec.filesystem("file"), local_path(url)
    return fsspec.core.url_to_fs(url)


def _with_retries(url: str, options: ReadOptions, action: Callable[[], T]) -> T:
    """`action()`, retried on transient errors; any other failure becomes a one-line LocationError."""
    for attempt in range(options.retries + 1):
        try:
            return action()
        except Exception as error:  # classified below; anything unrecognised is re-raised as it is
            status, kind = _classify(error, is_local(url))
            if kind is None:
                raise
            if kind != "transient":
                raise _permanent_error(url, status, kind) from error
            if attempt == options.retries:
                raise LocationError(
                    f"{url}: unreachable after {attempt + 1} attempts ({status}); check the network and the endpoint "
                    "(AWS_ENDPOINT_URL for s3://), or raise data.retries"
                ) from error
            time.sleep(min(options.backoff_s * 2**attempt, _MAX_BACKOFF_S))
    raise AssertionError("unreachable")


def _permanent_error(url: str, status: str, kind: str) -> LocationError:
    s3 = url.startswith("s3://")
    if kind == "forbidden":
        fix = _S3_CREDENTIALS_FIX if s3 else "access refused; check the URL and its permissions"
        return LocationError(f"{url}: {status} ({fix})")
    if kind == "no_bucket":
        bucket = url[len("s3://") :].split("/", 1)[0]
        return LocationError(
            f"{url}: {status} (no bucket {bucket!r} at the endpoint; check the URL and AWS_ENDPOINT_URL)"
        )
    if kind == "missing":
        return LocationNotFound(f"{url}: {status} (check the shard pattern and that the file exists)")
    return LocationError(f"{url}: {status}")


def _classify(error: BaseException, local: bool) -> tuple[str, str | None]:
    """(status text, kind) of a failed storage call; kind is transient, forbidden, no_bucket, missing, other or
    None (not a storage error)."""
    for cause in _causes(error):
        response = getattr(cause, "response", None)
        if isinstance(response, dict) and "Error" in response:  # botocore's ClientError
            return _classify_s3(response)
        status = getattr(cause, "status", None)
        if isinstance(status, int) and 400 <= status < 600:  # aiohttp's ClientResponseError
            return _classify_http(status, getattr(cause, "message", ""))
    for cause in _causes(error):
        if isinstance(cause, _transport_errors()):
            return f"{type(cause).__name__}: {cause}", "transient"
    if isinstance(error, FileNotFoundError):
        return "no such file" if local else "404 Not Found", "missing"
    if isinstance(error, PermissionError):
        return "permission denied" if local else "403 Forbidden", "forbidden"
    if isinstance(error, OSError):
        return f"{type(error).__name__}: {error}", "other"
    return "", None


def _classify_s3(response: dict) -> tuple[str, str]:
    code = response["Error"].get("Code", "")
    http_status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    status = f"{http_status} {code}".strip()
    if code == "NoSuchBucket":
        return status, "no_bucket"
    if code in ("NoSuchKey", "404") or http_status == 404:
        return status, "missing"
    if code in _FORBIDDEN_S3_CODES or http_status == 403:
        return status, "forbidden"
    if code in _TRANSIENT_S3_CODES or http_status in _TRANSIENT_STATUSES:
        return status, "transient"
    return status, "other"


def _classify_http(status: int, reason: str) -> tuple[str, str]:
    text = f"{status} {reason}".strip()
    if status == 404:
        return text, "missing"
    if status in (401, 403):
        return text, "forbidden"
    return text, "transient" if status in _TRANSIENT_STATUSES else "other"


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


@cache
def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures and timeouts of the libraries underneath (those installed)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import aiohttp

        errors += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    try:
        import botocore.exceptions

        errors += [botocore.exceptions.HTTPClientError, botocore.exceptions.ConnectionError]
    except ImportError:
        pass
    return tuple(errors)


class _ResumingStream(io.RawIOBase):
    """A remote file read front to back that, after a transient failure, reopens at the byte it reached."""

    def __init__(self, url: str, offset: int, options: ReadOptions) -> None:
        self.url, self.options, self.position = url, options, offset
        self._file: BinaryIO | None = _with_retries(url, options, self._open)

    def _open(self) -> BinaryIO:
        fs, path = _filesystem(self.url)
        file = fs.open(path, "rb")
        file.seek(self.position)
        return file

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        def attempt() -> bytes:
            if self._file is None:
                self._file = self._open()
            try:
                return self._file.read(len(buffer))
            except Exception:
                self._file.close()
                self._file = None
                raise

        data = _with_retries(self.url, self.options, attempt)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()
