"""The streaming read mode: deterministic batches independent of workers, every shard once per epoch, weighted and
resampled mixing, exact resume in the same layout and an announced fresh start in another, bad samples counted,
and local, pipe: and S3 shards read alike."""

from __future__ import annotations

import io
import itertools
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigmodel.config import ConfigError, load_config
from bigmodel.data import build_eval_loader, build_train_loader
from bigmodel.data.shards import write_shapes_shards
from bigmodel.data.streaming import StreamingEvalLoader, StreamingLoader, merge_rank_states, read_mode

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "configs" / "tiny.yaml"
PER_SHARD = 4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    """8 training shards of 4 shapes samples each (32 samples) and 2 eval shards."""
    return write_shapes_shards(tmp_path_factory.mktemp("shapes"), 32, 8, samples_per_shard=PER_SHARD)


def config(train_shards: str, *overrides: str, batch: int = 8):
    return load_config(
        TINY,
        [
            "--data.source=shards",
            f"--data.train_shards={train_shards}",
            "--data.mode=streaming",
            f"--train.global_batch_size={batch}",
            *overrides,
        ],
    )


def take(loader, count: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(loader), count))


def assert_same_batches(actual: list[dict], expected: list[dict]) -> None:
    # Exact: a sample's tensors are a pure function of its bytes and its key, so no tolerance is justified.
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name


def ids(batches: list[dict]) -> list[int]:
    return [int(i) for batch in batches for i in batch["sample_id"]]


def checkpointed(*loaders: StreamingLoader) -> dict:
    """What a checkpoint holds: every rank's state merged, through JSON as the manifest stores it."""
    return json.loads(json.dumps(merge_rank_states([loader.state_dict() for loader in loaders])))


def test_batches_are_deterministic_and_independent_of_the_worker_count(shapes) -> None:
    cfg = config(shapes["train_shards"], "--data.streams=2", "--data.shuffle_buffer=6")
    in_process = take(build_train_loader(cfg), 6)
    assert_same_batches(take(build_train_loader(cfg), 6), in_process)
    workers = config(shapes["train_shards"], "--data.streams=2", "--data.shuffle_buffer=6", "--data.num_workers=2")
    assert_same_batches(take(build_train_loader(workers), 6), in_process)
    assert torch.equal(in_process[0]["index"], in_process[0]["sample_id"])
    other_seed = take(build_train_loader(config(shapes["train_shards"], "--data.streams=2", "--train.seed=1")), 1)
    assert ids(other_seed) != ids(in_process[:1])


def test_every_shard_is_read_once_per_epoch_over_ranks_and_streams(shapes) -> None:
    # dp 2 x 2 streams = 4 readers of 2 shards (8 samples) each; without shuffling, the first 4 local batches of 4
    # on each rank cover the epoch: every sample exactly once, each shard's samples consecutively.
    cfg = config(shapes["train_shards"], "--data.streams=2", "--data.shuffle_buffer=1")
    seen = [ids(take(build_train_loader(cfg, dp_rank=rank, dp_size=2), 4)) for rank in range(2)]
    everything = seen[0] + seen[1]
    assert sorted(everything) == sorted((shard << 32) | member for shard in range(8) for member in range(PER_SHARD))
    for run in seen:
        for start in range(0, len(run), PER_SHARD):
            assert len({i >> 32 for i in run[start : start + PER_SHARD]}) == 1, "shards are read whole, in turn"


@pytest.mark.parametrize("resampled", [True, False])
def test_weighted_sources_are_drawn_in_proportion_to_weight_times_shards(shapes, resampled: bool) -> None:
    # Source A: shards 0-1, weight 3; source B: shards 2-7, weight 1. Every shard of a source weighs its weight
    # (OpenCLIP's upsampling factors), so a shard comes from A with p = 3*2 / (3*2 + 1*6) = 0.5.
    pattern = shapes["train_shards"].replace("{000000..000007}", "")
    a, b = pattern.replace(".tar", "{000000..000001}.tar"), pattern.replace(".tar", "{000002..000007}.tar")
    options = ["--data.train_weights=[3,1]", "--data.shuffle_buffer=1", f"--data.resampled={str(resampled).lower()}"]
    visits = [
        i >> 32 for i in ids(take(build_train_loader(config(f"{a}::{b}", *options)), 200)) if (i & 0xFFFFFFFF) == 0
    ]
    n, p = len(visits), 0.5
    from_a = sum(shard < 2 for shard in visits) / n
    # n = 400 shard visits; the binomial sd of the fraction is sqrt(p(1-p)/n) = 0.025, so 4.5 sd = 0.11 fails a
    # correct sampler with probability < 1e-5, while weights read as source shares (p = 0.75) sit 10 sd away.
    assert n == 200 * 8 // PER_SHARD
    assert abs(from_a - p) < 4.5 * math.sqrt(p * (1 - p) / n), from_a
    per_shard = Counter(visits)
    assert set(per_shard) == set(range(8))
    if not resampled:  # each source is dealt whole per epoch: its shards' visit counts differ by at most one
        for source in (range(2), range(2, 8)):
            assert max(per_shard[s] for s in source) - min(per_shard[s] for s in source) <= 1


@pytest.mark.parametrize(("dp_size", "workers_before", "workers_after"), [(1, 2, 2), (2, 2, 0)])
def test_resume_in_the_same_layout_continues_exactly(shapes, caplog, dp_size, workers_before, workers_after) -> None:
    common = ["--data.streams=2", "--data.shuffle_buffer=5"]
    before = config(shapes["train_shards"], *common, f"--data.num_workers={workers_before}")
    after = config(shapes["train_shards"], *common, f"--data.num_workers={workers_after}")
    uninterrupted = [take(build_train_loader(before, r, dp_size), 9) for r in range(dp_size)]
    stopped = [build_train_loader(before, r, dp_size) for r in range(dp_size)]
    for loader in stopped:  # prefetching workers have read ahead; the state holds only the batches taken
        take(loader, 5)
    state = checkpointed(*stopped)
    for rank in range(dp_size):
        resumed = build_train_loader(after, rank, dp_size)
        assert resumed.load_state_dict(state) is None
        assert_same_batches(take(resumed, 4), uninterrupted[rank][5:])
    assert not caplog.text, "resuming re-reads nothing that could look damaged"


def test_another_layout_starts_a_fresh_epoch_and_says_so(shapes) -> None:
    cfg = config(shapes["train_shards"], "--data.streams=2", "--data.shuffle_buffer=3")
    ranks = [build_train_loader(cfg, rank, 2) for rank in range(2)]
    for loader in ranks:
        take(loader, 3)
    single = build_train_loader(cfg)
    note = single.load_state_dict(checkpointed(*ranks))
    assert note is not None and "\n" not in note
    # Each of the 4 readers holds 2 shards (8 samples) an epoch; 2 batches of 4 plus 3 buffered took it into epoch 1.
    assert "dp_size 2 -> 1" in note and "fresh shard assignment from epoch 2" in note
    assert single.step == 3 and len(take(single, 2)) == 2
    indexed = build_train_loader(cfg).load_state_dict({"step": 4, "skipped": 0})
    assert "data.mode=indexed" in indexed


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for number, members in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{number:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_samples_are_skipped_and_counted(tmp_path) -> None:
    meta = json.dumps({"status": "success", "caption": "a red square"}).encode()
    samples = [
        {"png": png(10), "json": meta},
        {"png": b"not an image", "json": meta},  # undecodable
        {"png": png(20), "json": json.dumps({"status": "failed_to_download"}).encode()},
        {"png": png(30), "json": json.dumps({"status": "success"}).encode()},  # no caption under the key
        {"json": meta},  # no image
        {"png": png(40), "json": meta},
    ]
    write_tar(tmp_path / "a.tar", samples)
    write_tar(tmp_path / "b.tar", samples)
    cfg = config(
        f"{tmp_path}/{{a,b}}.tar", "--data.caption_key=caption", "--data.shuffle_buffer=1", "--model.vocab_size=128"
    )
    loader = build_train_loader(cfg)
    batches = take(loader, 1)  # 8 samples: 2 usable per shard per epoch, so two epochs of both shards
    assert {i & 0xFFFFFFFF for i in ids(batches)} == {0, 5}
    # Per shard read: 3 samples refused when parsed (status, caption key, image) and 1 when its image fails to decode.
    assert loader.state_dict()["skipped"] == 4 * 4


def test_a_caption_key_no_sample_has_is_one_line_error(tmp_path) -> None:
    write_tar(tmp_path / "a.tar", [{"png": png(1), "json": b'{"text": "a red square"}'} for _ in range(20)])
    loader = build_train_loader(config(str(tmp_path / "a.tar"), "--data.caption_key=caption", batch=2))
    with pytest.raises(ValueError, match=r"^data.caption_key 'caption': 16 samples in a row of .*a.tar lack it"):
        take(loader, 1)


def test_shards_without_a_usable_sample_are_an_error_not_a_hang(tmp_path) -> None:
    write_tar(tmp_path / "a.tar", [{"txt": b"a caption without its image"}] * 3)
    with pytest.raises(RuntimeError, match=r"read 2 shards in a row without a usable sample"):
        take(build_train_loader(config(str(tmp_path / "a.tar"), batch=2)), 1)


@pytest.mark.parametrize("cut", ["data", "header"])
def test_truncated_shard_is_read_up_to_the_damage(tmp_path, shapes, caplog, cut: str) -> None:
    path = shapes["train_shards"].replace("{000000..000007}", "000000")
    with tarfile.open(path) as tar:
        image, caption = tar.getmembers()[4:6]  # sample 2's members
    # Cut inside sample 2's image data: tarfile reports the short read. Cut inside its caption's header: tarfile
    # takes it for the end of the archive, so sample 2 lacks its caption and is a counted skip.
    end = image.offset_data + 10 if cut == "data" else caption.offset + 100
    (tmp_path / "cut.tar").write_bytes(Path(path).read_bytes()[:end])
    loader = build_train_loader(config(str(tmp_path / "cut.tar"), "--data.shuffle_buffer=1", batch=2))
    assert {i & 0xFFFFFFFF for i in ids(take(loader, 4))} == {0, 1}
    if cut == "data":
        assert "cut.tar: corrupt or truncated tar" in caplog.text
    else:
        assert loader.state_dict()["skipped"] == 3  # the 4 batches of 2 read the shard 4 times, the last unfinished


def test_local_pipe_and_s3_shards_give_the_same_batches(shapes, s3_server) -> None:
    folder = Path(shapes["train_shards"]).parent
    names = "train-{000000..000007}.tar"
    base = s3_server.upload(folder, s3_server.new_bucket(), "shapes")
    specs = [str(folder / names), f"{base}/{names}"]
    specs.append("::".join(f"pipe:cat {folder}/train-{n:06d}.tar" for n in range(8)))
    common = ["--data.streams=2", "--data.shuffle_buffer=5"]
    batches = [take(build_train_loader(config(spec, *common)), 3) for spec in specs]
    assert_same_batches(batches[1], batches[0])
    assert_same_batches(batches[2], batches[0])
    stopped = build_train_loader(config(specs[1], *common))
    take(stopped, 2)
    resumed = build_train_loader(config(specs[1], *common))
    resumed.load_state_dict(checkpointed(stopped))  # the buffered samples come back by ranged reads
    assert_same_batches(take(resumed, 1), batches[0][2:])


def test_eval_reads_every_sample_in_shard_order(shapes) -> None:
    cfg = config(shapes["train_shards"], f"--data.eval_shards={shapes['eval_shards']}")
    loader = build_eval_loader(cfg, batch_size=3)
    assert isinstance(loader, StreamingEvalLoader)
    first, second = list(loader), list(loader)
    assert [len(b["sample_id"]) for b in first] == [3, 3, 2]
    assert ids(first) == [(shard << 32) | member for shard in range(2) for member in range(PER_SHARD)]
    assert_same_batches(second, first)


def test_mode_auto_is_indexed_for_local_shards_and_streaming_for_remote(shapes) -> None:
    local = config(shapes["train_shards"], "--data.mode=auto").data
    assert read_mode(local, local.train_shards) == "indexed"
    for remote in ("s3://bucket/train-{0..3}.tar", "https://host/a.tar::/local/b.tar", "pipe:cat a.tar"):
        assert read_mode(local, remote) == "streaming"


def test_bad_settings_are_one_line_errors(shapes) -> None:
    pattern = shapes["train_shards"]
    with pytest.raises(ConfigError, match=r"has 2 weights but data.train_shards has 1 '::'-joined sources"):
        config(pattern, "--data.train_weights=[1,2]")
    with pytest.raises(ConfigError, match=r"data.train_weights needs data.mode=streaming"):
        config(pattern, "--data.train_weights=[1]", "--data.mode=indexed")
    with pytest.raises(ConfigError, match=r"data.num_workers=3 must divide data.streams=4"):
        config(pattern, "--data.streams=4", "--data.num_workers=3")
    with pytest.raises(ValueError, match=r"data.resampled needs data.mode=streaming, and data.mode=auto reads"):
        build_train_loader(config(pattern, "--data.resampled=true", "--data.mode=auto"))
    with pytest.raises(ValueError, match=r"has 8 shards, fewer than the 12 readers"):
        build_train_loader(config(pattern, "--data.streams=3", batch=12), dp_rank=0, dp_size=4)
