"""(j) The data loader against a plain decode-and-transform loop over the same JPEGs, from local disk and from an
S3 server; start-up over 10,000 indexed shards; num_workers scaling.

The JPEGs are cut from scikit-learn's two bundled photos (different crops and sizes, re-encoded at quality 90),
so nothing here depends on data made for the benchmark's own convenience. Every loader runs with the `clip`
transform at 224 pixels, the builtin tokenizer and MLM masking, i.e. all the per-sample work a training run does;
the baseline only reads, decodes, transforms and stacks.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bigmodel.bench.common import Figure, interleaved, median, paired_ratio
from bigmodel.config import Config, load_config
from bigmodel.data.build import build_train_loader
from bigmodel.data.index import write_indexes
from bigmodel.data.locations import expand_source
from bigmodel.data.shards import IndexedShards, write_shards
from bigmodel.data.transforms import build_transform

IMAGE_SIZE = 224
BATCH = 32
COMMAND = "bigmodel bench --only data"
_CAPTIONS = ("a red circle", "two blue squares", "a small green triangle", "a large yellow circle left of a square")


def photo_jpegs(count: int, seed: int = 0) -> Iterator[tuple[bytes, str, str]]:
    """`count` (JPEG bytes, "jpg", caption) samples: random crops (256-427 px a side) of scikit-learn's photos."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for index in range(count):
        photo = photos[index % len(photos)]
        h, w = (int(rng.integers(256, 428)) for _ in range(2))
        top, left = int(rng.integers(0, photo.shape[0] - h + 1)), int(rng.integers(0, photo.shape[1] - w + 1))
        buffer = io.BytesIO()
        Image.fromarray(photo[top : top + h, left : left + w]).save(buffer, format="JPEG", quality=90)
        yield buffer.getvalue(), "jpg", _CAPTIONS[index % len(_CAPTIONS)]


def _config(shards: str, mode: str, workers: int = 0) -> Config:
    return load_config(
        None,
        [
            "data.source=shards",
            f"data.train_shards={shards}",
            f"data.mode={mode}",
            "data.transform=clip",
            f"data.num_workers={workers}",
            f"data.shuffle_buffer={BATCH * 2}",
            f"train.global_batch_size={BATCH}",
            f"model.image_size={IMAGE_SIZE}",
            "model.patch_size=32",
        ],
    )


def plain_loop(shards: str, cfg: Config, batches: int) -> None:
    """Read the shards' JPEGs in order with tarfile, decode with PIL, apply the same transform, stack batches."""
    transform = build_transform(cfg, train=True)
    rng = np.random.default_rng(0)
    rows: list[np.ndarray] = []
    done = 0
    while True:
        for path in expand_source(shards):
            with tarfile.open(path) as tar:
                for member in tar:
                    if not member.name.endswith(".jpg"):
                        continue
                    with Image.open(tar.extractfile(member)) as image:
                        rows.append(transform(np.asarray(image.convert("RGB")), rng))
                    if len(rows) == BATCH:
                        torch.from_numpy(np.stack(rows))
                        rows, done = [], done + 1
                        if done == batches:
                            return


def loader_pass(cfg: Config, batches: int) -> None:
    """`batches` local batches of a fresh loader (start-up included)."""
    loader = iter(build_train_loader(cfg))
    for _ in range(batches):
        next(loader)


def steady_loader(cfg: Config, batches: int) -> Callable[[], None]:
    """A function that takes the next `batches` local batches of one loader built here, in the training process
    (num_workers 0: nothing runs between calls), so timing it gives the steady-state rate, start-up excluded."""
    loader = iter(build_train_loader(cfg))

    def take() -> None:
        for _ in range(batches):
            next(loader)

    return take


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server in a subprocess on loopback, with the AWS environment pointed at it; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    names = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict(zip(names, (endpoint, "testing", "testing", "us-east-1"), strict=True)))
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        server.wait()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _upload(local_dir: Path, bucket: str) -> str:
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for path in sorted(local_dir.glob("*.tar")):
        client.upload_file(str(path), bucket, path.name)
    return f"s3://{bucket}"


def _throughput_figure(name: str, title: str, times: dict[str, list[float]], samples: int, candidate: str) -> Figure:
    return Figure(
        name=name,
        title=title,
        ratio=paired_ratio(times["plain"], times[candidate]),
        target=0.9,
        direction=">=",
        baseline={
            "label": "plain decode + clip transform loop",
            "value": samples / median(times["plain"]),
            "unit": "samples/s",
        },
        candidate={"label": candidate, "value": samples / median(times[candidate]), "unit": "samples/s"},
        command=COMMAND,
        details={"seconds": times, "samples": samples, "image_size": IMAGE_SIZE, "batch": BATCH},
    )


def loader_throughput(folder: Path, quick: bool) -> list[Figure]:
    """Steady-state loader samples/s in the training process (num_workers 0, so one worker's work) over the plain
    loop, both modes from local disk and from the S3 server (start-up is figure data_startup's)."""
    batches, repeats = (4, 1) if quick else (8, 5)
    pattern = write_shards(photo_jpegs(batches * BATCH), folder / "jpeg", "train", per_shard=BATCH * 2)
    figures = []
    local = {
        "plain": lambda: plain_loop(pattern, _config(pattern, "indexed"), batches),
        "indexed": steady_loader(_config(pattern, "indexed"), batches),
        "streaming": steady_loader(_config(pattern, "streaming"), batches),
    }
    times = interleaved(local, repeats)
    for mode in ("indexed", "streaming"):
        figures.append(
            _throughput_figure(
                f"data_{mode}_local",
                f"loader ({mode}, local disk) / plain loop, samples/s",
                times,
                batches * BATCH,
                mode,
            )
        )
    with s3_server():
        remote = _upload(folder / "jpeg", "bench") + "/" + Path(pattern).name
        write_indexes(remote)
        s3 = {
            "plain": local["plain"],
            "indexed": steady_loader(_config(remote, "indexed"), batches),
            "streaming": steady_loader(_config(remote, "streaming"), batches),
        }
        times = interleaved(s3, repeats)
    for mode in ("indexed", "streaming"):
        figures.append(
            _throughput_figure(
                f"data_{mode}_s3",
                f"loader ({mode}, local S3 server) / plain loop from local disk, samples/s",
                times,
                batches * BATCH,
                mode,
            )
        )
    return figures


def worker_scaling(folder: Path, quick: bool) -> Figure:
    """Samples/s with data.num_workers 2 over 1 (indexed mode, local disk; the workers build whole batches)."""
    batches, repeats = (6, 1) if quick else (16, 3)
    pattern = write_shards(photo_jpegs(BATCH * 8, seed=1), folder / "workers", "train", per_shard=BATCH * 2)
    times = interleaved(
        {
            "1": lambda: loader_pass(_config(pattern, "indexed", workers=1), batches),
            "2": lambda: loader_pass(_config(pattern, "indexed", workers=2), batches),
        },
        repeats,
    )
    samples = batches * BATCH
    return Figure(
        name="data_workers",
        title="loader samples/s with data.num_workers 2 / with 1 (2-core machine)",
        ratio=paired_ratio(times["1"], times["2"]),
        target=1.6,
        direction=">=",
        baseline={"label": "num_workers 1", "value": samples / median(times["1"]), "unit": "samples/s"},
        candidate={"label": "num_workers 2", "value": samples / median(times["2"]), "unit": "samples/s"},
        command=COMMAND,
        details={"seconds": times, "samples": samples, "cores": len(os.sched_getaffinity(0))},
    )


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def indexed_startup(folder: Path, quick: bool) -> Figure:
    """Seconds to open 10,000 indexed shards (one summary read) over the same shards without indexes (every tar
    header scanned: what start-up costs without `bigmodel data index`)."""
    shards = 1_000 if quick else 10_000
    png = _tiny_png()
    samples = ((png, "png", f"sample {i}") for i in range(shards * 2))
    scanned = write_shards(samples, folder / "startup", "train", per_shard=2)
    index_seconds = time.perf_counter()
    write_indexes(scanned, str(folder / "startup-index"))
    index_seconds = time.perf_counter() - index_seconds
    times = interleaved(
        {
            "summary": lambda: IndexedShards(scanned, str(folder / "startup-index")),
            "scan": lambda: IndexedShards(scanned),
        },
        repeats=1 if quick else 3,
    )
    return Figure(
        name="data_startup",
        title=f"start-up over {shards:,} shards: with their indexes / scanning every tar",
        ratio=paired_ratio(times["summary"], times["scan"]),
        target=0.1,
        direction="<=",
        baseline={"label": "scan every tar header", "value": median(times["scan"]), "unit": "s"},
        candidate={"label": "read the index summary", "value": median(times["summary"]), "unit": "s"},
        command=COMMAND,
        details={"seconds": times, "shards": shards, "bigmodel_data_index_seconds": index_seconds},
    )


def data_throughput(quick: bool = False) -> list[Figure]:
    """Every data figure (j): loader vs plain loop (local, S3), worker scaling, indexed start-up."""
    with tempfile.TemporaryDirectory(prefix="bigmodel-bench-data-") as tmp:
        folder = Path(tmp)
        return [*loader_throughput(folder, quick), worker_scaling(folder, quick), indexed_startup(folder, quick)]
