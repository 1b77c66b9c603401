"""Shard locations: local paths, `::` sources, brace patterns, s3:// through a real S3 server, http(s):// through
http.server and pipe:COMMAND; retries of transient errors and one-line errors for the rest."""

from __future__ import annotations

import fsspec
import pytest

from bigmodel.data.locations import (
    LocationError,
    LocationNotFound,
    ReadOptions,
    expand_source,
    open_stream,
    read_range,
    shard_info,
    split_sources,
    write_bytes,
)

FAST = ReadOptions(retries=2, backoff_s=0.01)
"""Retries that wait 10 ms, then 20 ms: real backoff, short enough for a unit test."""
DATA = bytes(range(256)) * 40


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_s3_server_fixture_round_trips_through_the_standard_aws_environment(s3_server, tmp_path):
    (tmp_path / "hello.txt").write_bytes(b"hello s3")
    bucket = s3_server.new_bucket()
    prefix = s3_server.upload(tmp_path, bucket, "some/prefix")
    assert prefix == f"s3://{bucket}/some/prefix"
    assert s3_server.client.get_object(Bucket=bucket, Key="some/prefix/hello.txt")["Body"].read() == b"hello s3"
    # s3fs itself finds the endpoint and credentials in AWS_ENDPOINT_URL etc. (botocore reads them).
    with fsspec.open(f"{prefix}/hello.txt", "rb", skip_instance_cache=True) as file:
        assert file.read() == b"hello s3"


def test_sources_and_patterns(tmp_path):
    assert split_sources(" a.tar :: s3://b/{0..1}.tar ") == ["a.tar", "s3://b/{0..1}.tar"]
    with pytest.raises(ValueError, match="empty source") as error:
        split_sources("a.tar::")
    one_line(error)
    for name in ("x-0.tar", "x-1.tar"):
        (tmp_path / name).write_bytes(b"")
    assert expand_source(str(tmp_path / "x-{0..1}.tar")) == [str(tmp_path / "x-0.tar"), str(tmp_path / "x-1.tar")]
    with pytest.raises(FileNotFoundError, match=r"2 of 4 files missing \(first: .*x-2\.tar\)") as error:
        expand_source(str(tmp_path / "x-{0..3}.tar"))
    one_line(error)
    # Remote patterns are expanded without a request (no server runs on port 9 of 127.0.0.1).
    urls = expand_source("s3://bucket/train-{000000..009999}.tar")
    assert len(urls) == 10_000 and urls[-1] == "s3://bucket/train-009999.tar"
    assert expand_source("http://127.0.0.1:9/{a,b}.tar") == ["http://127.0.0.1:9/a.tar", "http://127.0.0.1:9/b.tar"]
    assert expand_source("pipe:cat {a,b}.tar") == ["pipe:cat {a,b}.tar"]


def test_local_s3_http_and_pipe_read_the_same_bytes(s3_server, http_server, tmp_path):
    (tmp_path / "shard.tar").write_bytes(DATA)
    local = str(tmp_path / "shard.tar")
    urls = [
        local,
        f"file://{local}",
        s3_server.upload(tmp_path, s3_server.new_bucket()) + "/shard.tar",
        http_server(tmp_path) + "/shard.tar",
    ]
    for url in urls:
        assert read_range(url, 1000, 300, FAST) == DATA[1000:1300], url
        assert shard_info(url, FAST).size == len(DATA), url
        with open_stream(url, 5000, FAST) as stream:
            assert stream.read() == DATA[5000:], url
    with open_stream(f"pipe:cat {local}", 7) as stream:
        assert stream.read() == DATA[7:]
    with pytest.raises(ValueError, match=r"data\.mode=streaming") as error:
        read_range(f"pipe:cat {local}", 0, 1)
    one_line(error)


def test_s3_etag_changes_with_the_object(s3_server, tmp_path):
    url = f"s3://{s3_server.new_bucket()}/shard.tar"
    write_bytes(url, DATA)
    before = shard_info(url)
    write_bytes(url, DATA[::-1])
    after = shard_info(url)
    assert before.size == after.size and before.etag != after.etag and before.etag


def test_transient_http_errors_are_retried_with_backoff(http_server, tmp_path):
    (tmp_path / "shard.tar").write_bytes(DATA)
    flaky = http_server(tmp_path, fail_first=2, fail_status=503)
    assert read_range(f"{flaky}/shard.tar", 10, 5, FAST) == DATA[10:15]
    assert flaky.requests == 3, "two 503s, then the answer"
    still_flaky = http_server(tmp_path, fail_first=3, fail_status=503)
    with pytest.raises(LocationError, match=r"/shard\.tar: unreachable after 3 attempts \(503") as error:
        read_range(f"{still_flaky}/shard.tar", 10, 5, FAST)
    one_line(error)
    assert still_flaky.requests == 3
    throttled = http_server(tmp_path, fail_first=1, fail_status=429)
    with open_stream(f"{throttled}/shard.tar", 0, FAST) as stream:
        assert stream.read() == DATA


def test_unreachable_endpoint_names_the_url_after_the_retries(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: nothing listens there
    for url in ("s3://bucket/shard.tar", "http://127.0.0.1:9/shard.tar"):
        with pytest.raises(LocationError, match=rf"^{url}: unreachable after 3 attempts") as error:
            read_range(url, 0, 10, FAST)
        one_line(error)


def test_permanent_errors_are_one_line_without_retries(s3_server, s3_auth_server, http_server, tmp_path, monkeypatch):
    bucket = s3_server.new_bucket()
    with pytest.raises(LocationNotFound, match=rf"^s3://{bucket}/nope.tar: 404 NoSuchKey") as error:
        read_range(f"s3://{bucket}/nope.tar", 0, 1, FAST)
    one_line(error)
    with pytest.raises(
        LocationError, match=r"^s3://no-such-bucket/x.tar: 404 NoSuchBucket .*AWS_ENDPOINT_URL"
    ) as error:
        read_range("s3://no-such-bucket/x.tar", 0, 1, FAST)
    one_line(error)
    forbidden = http_server(tmp_path, fail_first=5, fail_status=403)
    with pytest.raises(LocationError, match=r"shard\.tar: 403 Forbidden") as error:
        read_range(f"{forbidden}/shard.tar", 0, 1, FAST)
    assert forbidden.requests == 1, "a 403 is not retried"
    with pytest.raises(LocationNotFound, match=r"missing\.tar: 404 Not Found") as error:
        read_range(f"{http_server(tmp_path)}/missing.tar", 0, 1, FAST)
    one_line(error)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_auth_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    expected = r"^s3://bucket/x.tar: 403 InvalidAccessKeyId \(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
    with pytest.raises(LocationError, match=expected + r"~/\.aws/credentials\)$") as error:
        read_range("s3://bucket/x.tar", 0, 1, FAST)
    one_line(error)


def test_a_stream_broken_mid_shard_resumes_at_the_byte_it_reached(http_server, tmp_path):
    big = bytes(range(256)) * (48 * 1024)  # 12 MiB: more than one of fsspec's 5 MiB read-ahead blocks
    (tmp_path / "big.tar").write_bytes(big)
    server = http_server(tmp_path)
    with open_stream(f"{server}/big.tar", 3, FAST) as stream:
        head = stream.read(1 << 20)
        server.failures["left"] = 2  # the next two requests answer 503: the block fetch, then the reopening
        rest = stream.read()
    assert server.failures["left"] == 0, "both failures were met"
    assert head + rest == big[3:]
