"""Evaluation set layouts: ImageFolder trees of real images, CLIP_benchmark's WebDataset shards, captions.json
folders, the built-in shapes task, and the one-line errors for bad input."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from bigmodel.data.shapes import SHAPES, render_shapes
from bigmodel.eval.datasets import load_classification, load_retrieval, read_templates


def digit_images(per_class: int = 3) -> list[tuple[np.ndarray, int]]:
    """scikit-learn's 8x8 handwritten digits as 32x32 RGB uint8 images with their digit, `per_class` of each."""
    digits = load_digits()
    chosen = [i for d in range(10) for i in np.flatnonzero(digits.target == d)[:per_class]]
    out = []
    for i in chosen:
        grey = (digits.images[i] * (255 / 16)).astype(np.uint8)
        big = np.asarray(Image.fromarray(grey).resize((32, 32), Image.NEAREST).convert("RGB"))
        out.append((big, int(digits.target[i])))
    return out


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_folder(root: Path, per_class: int = 3) -> list[tuple[np.ndarray, int]]:
    samples = digit_images(per_class)
    for n, (image, digit) in enumerate(samples):
        folder = root / f"digit_{digit}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{n:03d}.png").write_bytes(png(image))
    return samples


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_image_folder_classes_come_from_folders_or_classnames(tmp_path):
    samples = write_image_folder(tmp_path)
    data, templates = load_classification(str(tmp_path), None)
    assert data.classnames == [f"digit_{d}" for d in range(10)] and templates is None
    assert data.labels == [digit for _, digit in samples]
    assert all(np.array_equal(data.images.read(i), image) for i, (image, _) in enumerate(samples))

    (tmp_path / "classnames.txt").write_text(
        "\n".join(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]) + "\n"
    )
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a photo of the number {c}.\n{c}\n")
    data, templates = load_classification(str(tmp_path), None)
    assert data.classnames[7] == "seven" and templates == ["a photo of the number {c}.", "{c}"]
    override = tmp_path / "mine.txt"
    override.write_text("a digit {c}\n")
    assert load_classification(str(tmp_path), str(override))[1] == ["a digit {c}"]


def test_webdataset_shards_in_clip_benchmark_layout(tmp_path):
    samples = digit_images(2)
    (tmp_path / "test").mkdir()
    for shard in range(2):  # two shards, ten samples each, read in shard then tar order
        with tarfile.open(tmp_path / "test" / f"{shard}.tar", "w") as tar:
            for n in range(10):
                image, digit = samples[shard * 10 + n]
                add_member(tar, f"s{shard}{n:03d}.webp" if n == 0 else f"s{shard}{n:03d}.png", png(image))
                add_member(tar, f"s{shard}{n:03d}.cls", f"{digit}\n".encode())
    (tmp_path / "classnames.txt").write_text("\n".join(str(d) for d in range(10)))
    (tmp_path / "zeroshot_classification_templates.txt").write_text('a photo of the number: "{c}".\n')
    data, templates = load_classification(str(tmp_path), None)
    assert data.labels == [digit for _, digit in samples] and templates == ['a photo of the number: "{c}".']
    # Lossless PNG bytes stored under a .webp name still decode: PIL reads the format from the data.
    assert all(np.array_equal(data.images.read(i), image) for i, (image, _) in enumerate(samples))


def test_retrieval_layouts_keep_every_caption_of_an_image(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    samples = digit_images(1)[:3]
    captions = {f"{d}.png": [f"the digit {d}", f"a handwritten {d}"] for _, d in samples}
    for image, d in samples:
        (folder / f"{d}.png").write_bytes(png(image))
    (folder / "captions.json").write_text(json.dumps(captions))
    data = load_retrieval(str(folder))
    assert data.captions == list(captions.values()) and len(data.images) == 3

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "0.tar", "w") as tar:
        for image, d in samples:
            add_member(tar, f"{d}.jpg", png(image))
            add_member(tar, f"{d}.txt", f"the digit {d}\n\na handwritten {d}\n".encode())
    data = load_retrieval(str(shards))
    assert data.captions == list(captions.values())
    assert np.array_equal(data.images.read(2), samples[2][0])


def test_shapes_task_labels_each_single_shape_image(tmp_path):
    data, templates = load_classification("shapes", None, size=20, image_size=32)
    assert data.classnames == list(SHAPES) and len(data.images) == 20
    for i in (0, 7, 19):
        image, caption = render_shapes("eval", i, 32, 1)
        assert " and " not in caption and caption.split()[3] == data.classnames[data.labels[i]]
        assert np.array_equal(data.images.read(i), image)
    assert all("{c}" in t for t in templates) and len(templates) == 16


def test_bad_input_is_a_one_line_error(tmp_path):
    write_image_folder(tmp_path / "empty_class")
    (tmp_path / "empty_class" / "digit_10").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*digit_10 holds no images"):
        load_classification(str(tmp_path / "empty_class"), None)

    write_image_folder(tmp_path / "names")
    (tmp_path / "names" / "classnames.txt").write_text("zero\none\n")
    with pytest.raises(ValueError, match="names 2 classes but the dataset has 10"):
        load_classification(str(tmp_path / "names"), None)

    bad = tmp_path / "templates.txt"
    bad.write_text("a photo of a {c}.\na photo of a thing.\n")
    with pytest.raises(ValueError, match=r"line 2 .* has no \{c\}"):
        read_templates(bad)
