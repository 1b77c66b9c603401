"""WebDataset tar shards: the on-disk format of image-text pairs.

A sample is a group of tar members sharing a key (the member name up to the first dot of its basename, as in
webdataset): one image (`KEY.png` or `KEY.jpg`, also jpeg or webp) and its caption (`KEY.txt`, UTF-8). Shards are
written with `webdataset.ShardWriter` and read with random access through an index of member offsets, so that
any rank can fetch any sample of the global stream without streaming through the shards.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import webdataset
from braceexpand import braceexpand
from PIL import Image

from bigmodel.data.shapes import render_shapes

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
"""Image member extensions the reader accepts (lowercase)."""
PACK_SEED = 0
"""Seed of the train/eval split drawn by `pack_pairs`; fixed so repacking the same pairs gives the same split."""
_MAX_OPEN_FILES = 64
# webdataset's own rule (webdataset.tariterators.base_plus_ext): the key keeps the directories and the basename up
# to its first dot; everything after that dot is the member's extension.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class BadSample(Exception):
    """A sample that cannot be used: missing image or caption, undecodable image or empty caption."""


def expand_pattern(pattern: str) -> list[str]:
    """The shard files named by a brace pattern such as data/train-{000000..000009}.tar.

    Raises ValueError for an empty pattern and FileNotFoundError (naming the pattern) if any file is missing.
    """
    if not pattern.strip():
        raise ValueError("empty shard pattern; give a path such as data/train-{000000..000009}.tar")
    paths = list(braceexpand(pattern))
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"shard pattern {pattern}: {len(missing)} of {len(paths)} files missing (first: {missing[0]})"
        )
    return paths


def decode_image(data: bytes) -> np.ndarray:
    """Decode image file bytes to an (H, W, 3) uint8 RGB array; raises BadSample if they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    # PIL signals corrupt or truncated data with any of these, depending on where decoding stops.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadSample(f"undecodable image ({error})") from None


def _index_shard(path: str) -> list[tuple[str, str | None, tuple[int, int], tuple[int, int]]]:
    """(key, image extension, image (offset, size), caption (offset, size)) per sample of one shard, in order.

    A missing image has extension None and a missing member has size -1; both are reported as BadSample on read.
    """
    members: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                match = _MEMBER_NAME.match(info.name)
                if info.isfile() and match:
                    members.setdefault(match.group(1), {})[match.group(2).lower()] = (info.offset_data, info.size)
    except tarfile.ReadError as error:
        raise ValueError(f"shard {path} is not an uncompressed tar file ({error})") from None
    entries = []
    for key, by_ext in members.items():
        image_ext = next((ext for ext in by_ext if ext in IMAGE_EXTENSIONS), None)
        image = by_ext[image_ext] if image_ext else (0, -1)
        entries.append((key, image_ext, image, by_ext.get("txt", (0, -1))))
    return entries


class IndexedShards:
    """Random access to the samples of a set of shards, numbered in pattern order, then order within a shard.

    The index (member offsets) is built once on construction by reading the tar headers. Files are opened lazily
    and per process, so an instance can be handed to DataLoader workers (forked or pickled).
    """

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.paths = expand_pattern(pattern)
        entries = [(shard, entry) for shard, path in enumerate(self.paths) for entry in _index_shard(path)]
        if not entries:
            raise ValueError(f"shard pattern {pattern}: the shards hold no samples")
        self._extensions = sorted({entry[1] or "" for _, entry in entries})
        self._shard = np.array([shard for shard, _ in entries], dtype=np.int32)
        self._image_ext = np.array([self._extensions.index(entry[1] or "") for _, entry in entries], dtype=np.int16)
        self._image = np.array([entry[2] for _, entry in entries], dtype=np.int64)  # (N, 2): offset, size
        self._caption = np.array([entry[3] for _, entry in entries], dtype=np.int64)  # (N, 2): offset, size
        self._files: OrderedDict[int, BinaryIO] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._shard)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        return state

    def _file(self, shard: int) -> BinaryIO:
        if self._pid != os.getpid():  # a forked worker must not share the parent's file positions
            self._files, self._pid = OrderedDict(), os.getpid()
        if shard in self._files:
            self._files.move_to_end(shard)
        else:
            if len(self._files) >= _MAX_OPEN_FILES:
                self._files.popitem(last=False)[1].close()
            self._files[shard] = open(self.paths[shard], "rb")  # noqa: SIM115 (kept open across reads)
        return self._files[shard]

    def _read(self, index: int, member: np.ndarray, what: str) -> bytes:
        offset, size = (int(value) for value in member[index])
        if size < 0:
            raise BadSample(f"sample {index} of {self.pattern} has no {what}")
        file = self._file(int(self._shard[index]))
        file.seek(offset)
        return file.read(size)

    def caption(self, index: int) -> str:
        """The caption of sample `index`, stripped; raises BadSample if missing, not UTF-8 or empty."""
        try:
            caption = self._read(index, self._caption, "caption").decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadSample(f"sample {index} of {self.pattern}: caption is not UTF-8") from None
        if not caption:
            raise BadSample(f"sample {index} of {self.pattern}: empty caption")
        return caption

    def raw(self, index: int) -> tuple[bytes, str, str]:
        """Image bytes, image extension and caption of sample `index`; raises BadSample as `caption` does."""
        caption = self.caption(index)
        return self._read(index, self._image, "image"), self._extensions[self._image_ext[index]], caption

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

    def close(self) -> None:
        """Close the files this process opened; later reads reopen them."""
        while self._files:
            self._files.popitem()[1].close()


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
