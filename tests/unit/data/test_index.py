"""Shard indexes and indexed reads: `bigmodel data index`, start-up from summaries, changed shards, remote shards
read by byte ranges (S3 and HTTP servers on loopback), the img2dataset layout and damaged tars."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bigmodel.cli.main import main as bigmodel_main
from bigmodel.config.schema import Config, DataConfig, TrainConfig
from bigmodel.data import build_train_loader
from bigmodel.data.index import INDEX_SUFFIX, ShardEntry, read_index, scan_shard, write_indexes, write_summary
from bigmodel.data.locations import ReadOptions, ShardInfo
from bigmodel.data.shapes import render_shapes
from bigmodel.data.shards import BadSample, FailedSample, IndexedShards, MissingCaptionKey, write_shapes_shards

FAST = ReadOptions(retries=1, backoff_s=0.01)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def shapes(folder: Path, train: int = 40, per_shard: int = 16) -> str:
    return write_shapes_shards(folder, train, 4, image_size=32, max_shapes=2, samples_per_shard=per_shard)[
        "train_shards"
    ]


def all_raw(shards: IndexedShards) -> list[tuple[bytes, str, str]]:
    return [shards.raw(index) for index in range(len(shards))]


def test_cli_index_beside_the_shards_and_into_a_folder(tmp_path, capsys):
    pattern = shapes(tmp_path / "data")
    scanned = all_raw(IndexedShards(pattern))
    assert bigmodel_main(["data", "index", pattern]) == 0
    assert "indexed 3 shards (40 samples)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "data").glob(f"*{INDEX_SUFFIX}")) == [
        f"train-00000{i}.tar{INDEX_SUFFIX}" for i in range(3)
    ]
    assert all_raw(IndexedShards(pattern)) == scanned
    out = tmp_path / "indexes"
    assert bigmodel_main(["data", "index", pattern, "--out", str(out)]) == 0
    assert f"data.index_dir: {out}" in capsys.readouterr().out
    for path in (tmp_path / "data").glob(f"*{INDEX_SUFFIX}"):
        path.unlink()
    from_folder = IndexedShards(pattern, index_dir=str(out))
    assert from_folder._scanned == {}, "every shard's index came from the folder"
    assert all_raw(from_folder) == scanned


def test_startup_reads_one_summary_per_source_and_no_tar(http_server, tmp_path):
    shapes(tmp_path)
    server = http_server(tmp_path)
    pattern = f"{server}/train-{{000000..000002}}.tar"
    # Indexed where it is served (HTTP's Last-Modified is its version tag), written to a folder served beside it.
    write_indexes(pattern, str(tmp_path / "idx"), FAST)
    before = server.requests
    shards = IndexedShards(pattern, index_dir=f"{server}/idx", options=FAST)
    assert server.requests - before == 1, "start-up read the summary only"
    assert len(shards) == 40
    image, caption = shards.load(17)
    assert (image == render_shapes("train", 17, 32, 2)[0]).all() and caption == render_shapes("train", 17, 32, 2)[1]
    # First read from a shard: its index, a HEAD for its size and version, one ranged GET for the sample's members.
    assert server.requests - before == 4
    shards.load(18)
    assert server.requests - before == 5
    # A batch's samples are fetched together (concurrently) by prefetch; the loads that follow read nothing more.
    batch = [19, 20, 25, 5]  # shard 1 (its index already read) and shard 0 (its index and a HEAD first)
    shards.prefetch(batch)
    assert server.requests - before == 5 + 2 + len(batch)
    for index in batch:
        image, caption = shards.load(index)
        assert (image == render_shapes("train", index, 32, 2)[0]).all()
    assert server.requests - before == 5 + 2 + len(batch), "the prefetched samples were used, not fetched again"
    shards.load(19)
    assert server.requests - before == 5 + 2 + len(batch) + 1, "a prefetched sample is read from the cache once"


def test_indexed_shards_over_s3_equal_local_sample_for_sample(s3_server, tmp_path):
    first, second = shapes(tmp_path / "a", 40), shapes(tmp_path / "b", 20, per_shard=8)
    local = IndexedShards(f"{first}::{second}")
    bucket = s3_server.new_bucket()
    remote_a = s3_server.upload(tmp_path / "a", bucket, "a") + "/train-{000000..000002}.tar"
    remote_b = s3_server.upload(tmp_path / "b", bucket, "b") + "/train-{000000..000002}.tar"
    assert bigmodel_main(["data", "index", f"{remote_a}::{remote_b}"]) == 0
    remote = IndexedShards(f"{remote_a}::{remote_b}", options=FAST)
    assert len(remote) == len(local) == 60
    assert all_raw(remote) == all_raw(local)
    remote.prefetch(range(60))
    assert all_raw(remote) == all_raw(local), "prefetched (concurrent) reads return the same samples"
    assert remote.shard_urls[3] == f"s3://{bucket}/b/train-000000.tar"
    # Sample 45 is member 5 of the second source's first shard: global shard 3 (a's three shards come first).
    assert remote.sample_id(45) == local.sample_id(45) == (3 << 32) | 5
    assert [remote.sample_id(i) for i in (0, 15, 16, 39, 40, 59)] == [
        0,
        15,
        1 << 32,
        (2 << 32) | 7,
        3 << 32,
        5 << 32 | 3,
    ]


def test_a_remote_shard_without_an_index_is_a_one_line_error(http_server, tmp_path):
    pattern = f"{http_server(tmp_path)}/train-{{000000..000002}}.tar"
    shapes(tmp_path)
    with pytest.raises(
        ValueError, match=r"train-000000\.tar has no index .*`bigmodel data index .*data\.mode=streaming"
    ):
        IndexedShards(pattern, options=FAST)


def test_a_changed_shard_is_named_with_the_fix(tmp_path, s3_server):
    pattern = shapes(tmp_path)
    write_indexes(pattern)
    shard = tmp_path / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])  # one tar block fewer: a different size
    shards = IndexedShards(pattern)
    shards.load(0)  # other shards still read
    with pytest.raises(
        ValueError, match=r"train-000001\.tar no longer matches its index .*re-run `bigmodel data index"
    ):
        shards.load(16)
    with pytest.raises(ValueError) as error:
        shards.load(20)
    one_line(error)
    bucket = s3_server.new_bucket()
    remote = s3_server.upload(tmp_path, bucket) + "/train-{000000..000002}.tar"
    write_indexes(remote)
    s3_server.client.put_object(
        Bucket=bucket, Key="train-000002.tar", Body=(tmp_path / "train-000000.tar").read_bytes()
    )
    with pytest.raises(ValueError, match=r"s3://.*/train-000002\.tar no longer matches its index .*etag"):
        IndexedShards(remote, options=FAST).load(39)


def img2dataset_shard(path: Path, samples: list[dict]) -> None:
    """A shard as img2dataset writes it: KEY.jpg, KEY.txt and KEY.json per sample."""
    with tarfile.open(path, "w") as tar:
        for index, sample in enumerate(samples):
            image = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), index * 10, np.uint8)).save(image, format="JPEG")
            meta = {"key": f"{index:09d}", "url": f"http://example.com/{index}.jpg", "width": 8, **sample}
            members = {
                "jpg": image.getvalue(),
                "txt": meta.get("caption", "").encode(),
                "json": json.dumps(meta).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{index:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_img2dataset_layout_status_and_caption_key(tmp_path, caplog):
    samples = [
        {"caption": "a red car", "alt": "car", "status": "success"},
        {"caption": "not downloaded", "alt": "x", "status": "failed_to_download"},
        {"caption": "a blue boat", "status": "success"},  # no "alt"
        {"caption": "a green tree", "alt": "tree"},  # no status: taken as downloaded
    ]
    img2dataset_shard(tmp_path / "00000.tar", samples)
    (tmp_path / "00000.parquet").write_bytes(b"PAR1 not read")
    (tmp_path / "00000_stats.json").write_text("{}")
    by_txt = IndexedShards(str(tmp_path / "00000.tar"))
    assert by_txt.raw(0)[1:] == ("jpg", "a red car")
    with pytest.raises(FailedSample, match=r"00000\.tar: sample 000000001: img2dataset status 'failed_to_download'"):
        by_txt.raw(1)
    by_alt = IndexedShards(str(tmp_path / "00000.tar"), caption_key="alt")
    assert [by_alt.caption(i) for i in (0, 3)] == ["car", "tree"]
    with pytest.raises(MissingCaptionKey, match=r"no field 'alt' .*set data.caption_key to one of them or to txt"):
        by_alt.raw(2)
    with pytest.raises(ValueError, match=r"data.caption_key 'title': none of the first 4 samples .* has it") as error:
        IndexedShards(str(tmp_path / "00000.tar"), caption_key="title")
    one_line(error)
    # The loader substitutes the next usable sample for the failed one and the one without the key, and counts them.
    cfg = Config(
        data=DataConfig(source="shards", train_shards=str(tmp_path / "00000.tar"), caption_key="alt", augment=False),
        train=TrainConfig(global_batch_size=4, seed=0),
    )
    cfg.model.image_size, cfg.model.patch_size = 8, 4
    loader = build_train_loader(cfg, 0, 1)
    batch = next(iter(loader))
    # 1 -> 3 (1 and 2 skipped), 2 -> 3 (2 skipped): the next usable index, as for any bad sample.
    assert sorted(batch["index"].tolist()) == [0, 3, 3, 3] and loader.skipped == 3
    assert any("no field 'alt'" in record.getMessage() for record in caplog.records)


def test_damaged_tars(tmp_path):
    pattern = shapes(tmp_path, 16, per_shard=16)
    whole = (tmp_path / "train-000000.tar").read_bytes()
    image_offset, _ = scan_shard(pattern).members(8)["png"]
    (tmp_path / "cut.tar").write_bytes(whole[: image_offset + 10])  # ends inside sample 8's image
    cut = IndexedShards(str(tmp_path / "cut.tar"))
    assert len(cut) == 9 and cut.raw(7) == IndexedShards(pattern).raw(7)
    with pytest.raises(BadSample, match=r"cut\.tar: sample 000000008 is cut off \(truncated tar\)"):
        cut.load(8)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match=r"junk\.tar is not an uncompressed tar file") as error:
        IndexedShards(str(tmp_path / "junk.tar"))
    one_line(error)
    assert read_index(str(tmp_path / "junk.tar")) is None
    assert len(scan_shard(str(tmp_path / "train-000000.tar"))) == 16


def test_startup_for_ten_thousand_remote_shards_reads_only_the_summary(s3_server):
    # The shards do not exist: start-up touching any of them would fail with NoSuchKey.
    pattern = f"s3://{s3_server.new_bucket()}/laion/{{000000..009999}}.tar"
    entries = [ShardEntry(f"{n:06d}.tar", 1000 + n % 7, ShardInfo(1 << 28, f"etag{n}")) for n in range(10_000)]
    write_summary(pattern, entries)
    shards = IndexedShards(pattern, options=FAST)
    assert len(shards) == sum(e.samples for e in entries) and len(shards.shard_urls) == 10_000
    last = len(shards) - 1
    assert shards.sample_id(last) == (9999 << 32) | (entries[-1].samples - 1)
    with pytest.raises(ValueError, match=r"009999\.tar: its index s3://.*/009999\.tar\.index\.json is missing"):
        shards.load(last)
    with pytest.raises(ValueError, match=r"^pipe:cat x\.tar: a pipe: source can only be streamed; set data\.mode"):
        IndexedShards("pipe:cat x.tar")
