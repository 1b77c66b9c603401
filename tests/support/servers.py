"""Real servers on loopback for tests of remote shards: moto's S3 API server and a folder served over HTTP.

`s3_server` (session-scoped) runs moto's standalone server and points the standard AWS environment at it for the
whole session, so boto3, s3fs and subprocesses (torchrun workers) reach it with no extra options;
`s3_auth_server` is one that refuses every credential (403). `http_server` is
a factory: `http_server(folder)` serves a folder with `http.server` (Range requests included, as object stores and
CDNs answer them) and returns the base URL; `fail_first=N` answers the first N requests with `fail_status`.
"""

from __future__ import annotations

import http.server
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

S3_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""Credentials and region the S3 server accepts (moto accepts any; these are its documented test values)."""
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclass
class S3Server:
    """A running S3-API server: its endpoint, a boto3 client for it, and a helper that uploads a folder."""

    endpoint_url: str
    client: object

    def upload(self, local_dir: str | Path, bucket: str, prefix: str = "") -> str:
        """Upload every file under `local_dir` to s3://bucket/prefix/ (the bucket is created if missing), keeping
        relative paths; returns the s3:// URL of the prefix without a trailing slash."""
        local_dir = Path(local_dir)
        existing = {b["Name"] for b in self.client.list_buckets()["Buckets"]}
        if bucket not in existing:
            self.client.create_bucket(Bucket=bucket)
        prefix = prefix.strip("/")
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            key = "/".join(part for part in (prefix, path.relative_to(local_dir).as_posix()) if part)
            self.client.upload_file(str(path), bucket, key)
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    def new_bucket(self) -> str:
        """A fresh, empty bucket's name (tests sharing the session server stay apart)."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 (a free port), with AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION set in os.environ until the session ends."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    environment = {**S3_ENVIRONMENT, "AWS_ENDPOINT_URL": endpoint}
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        yield S3Server(endpoint, boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture(scope="session")
def s3_auth_server() -> Iterator[str]:
    """The endpoint URL of a second moto S3 server, in a subprocess, that checks credentials: it knows no access
    key, so every request answers 403 InvalidAccessKeyId (what a wrong AWS_ACCESS_KEY_ID gets from AWS)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server on port {port} did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENVIRONMENT["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENVIRONMENT["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENVIRONMENT["AWS_DEFAULT_REGION"],
    }


class _FolderHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus single-range GETs (206) and a number of injected failures."""

    failures: dict[str, int]  # {"left": requests still to fail, "status": their status, "seen": requests served}

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _inject_failure(self) -> bool:
        self.failures["seen"] += 1
        if self.failures["left"] <= 0:
            return False
        self.failures["left"] -= 1
        self.send_error(self.failures["status"])
        return True

    def do_HEAD(self) -> None:
        if not self._inject_failure():
            super().do_HEAD()

    def do_GET(self) -> None:
        if self._inject_failure():
            return
        match = _RANGE.match(self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not match or not path.is_file():
            super().do_GET()
            return
        data = path.read_bytes()
        first, last = match.groups()
        start = int(first) if first else max(0, len(data) - int(last))
        end = min(len(data) - 1, int(last)) if first and last else len(data) - 1
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(data[start : end + 1])


class HTTPFolder(str):
    """The base URL of a served folder (no trailing slash), also telling how many requests it has answered."""

    failures: dict[str, int]

    @property
    def requests(self) -> int:
        return self.failures["seen"]


@pytest.fixture
def http_server() -> Iterator[Callable[..., HTTPFolder]]:
    """Factory: `http_server(folder, fail_first=0, fail_status=503)` serves `folder` on 127.0.0.1 until the test
    ends and returns its base URL (an HTTPFolder: a str with a `.requests` count)."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(folder: str | Path, fail_first: int = 0, fail_status: int = 503) -> HTTPFolder:
        failures = {"left": fail_first, "status": fail_status, "seen": 0}
        handler = type("Handler", (_FolderHandler,), {"failures": failures})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        url = HTTPFolder(f"http://127.0.0.1:{server.server_address[1]}")
        url.failures = failures
        return url

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()
