"""Evaluation sets for the zero-shot tasks: ImageFolder trees, CLIP_benchmark's WebDataset shards, folders of
captioned images and the embedded shapes dataset.

Images are read lazily, one sample at a time, so an evaluation set never has to fit in memory; a set's order is
fixed (sorted folders and files, shards in name order, samples in tar order), which distributed evaluation relies on.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from bigmodel.data.shapes import COLOURS, SHAPES, SIZES, render_shapes
from bigmodel.data.shards import IMAGE_EXTENSIONS, BadSample, decode_image
from bigmodel.eval.templates import check_templates

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
CAPTIONS_FILE = "captions.json"
SHAPES_TASKS = {"shapes": "shape", "shapes-colours": "colour"}
"""Built-in --dataset names: held-out single-shape images of the embedded dataset, classified by shape or colour."""


class Images(Protocol):
    def __len__(self) -> int: ...

    def read(self, index: int) -> np.ndarray:
        """Image `index` as (H, W, 3) uint8 RGB; ValueError naming it if it does not decode."""
        ...


@dataclass(frozen=True)
class ClassificationSet:
    images: Images
    labels: list[int]
    """Class index of each image."""
    classnames: list[str]
    templates: list[str] | None
    """The dataset's own prompt templates, if it has any."""


@dataclass(frozen=True)
class RetrievalSet:
    images: Images
    captions: list[list[str]]
    """Every image's captions (at least one each)."""


class ImageFiles:
    """Images from files, in the given order."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:
        return _decoded(self.paths[index].read_bytes(), str(self.paths[index]))


class TarMembers:
    """Images stored in tar files, each read by its (tar path, data offset, size) without scanning the tar again."""

    def __init__(self, members: Sequence[tuple[Path, int, int, str]]) -> None:
        self.members = list(members)

    def __len__(self) -> int:
        return len(self.members)

    def read(self, index: int) -> np.ndarray:
        path, offset, size, name = self.members[index]
        with path.open("rb") as file:
            file.seek(offset)
            return _decoded(file.read(size), f"{path}:{name}")


class ShapesImages:
    """Held-out images of the embedded dataset with exactly one shape each."""

    def __init__(self, size: int, image_size: int) -> None:
        self.size, self.image_size = size, image_size

    def __len__(self) -> int:
        return self.size

    def read(self, index: int) -> np.ndarray:
        return render_shapes("eval", index, self.image_size, max_shapes=1)[0]


def _decoded(data: bytes, name: str) -> np.ndarray:
    try:
        return decode_image(data)
    except BadSample as error:
        raise ValueError(f"{name}: {error}") from None


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def _lines(path: Path) -> list[str]:
    """The non-empty lines of a text file, stripped."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_templates(path: Path) -> list[str]:
    """Prompt templates, one per line, each containing `{c}`; ValueError (one line) otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"templates file {path} does not exist")
    return check_templates(_lines(path), str(path))


def _shard_folder(root: Path) -> Path | None:
    """Where a CLIP_benchmark-style WebDataset keeps its shards: the folder itself or its test/ split."""
    for folder in (root, root / "test"):
        if any(folder.glob("*.tar")):
            return folder
    return None


def _tar_samples(folder: Path) -> list[tuple[Path, str, dict[str, tarfile.TarInfo]]]:
    """(shard, key, {extension: member}) for every sample of the shards in `folder`, in shard-name and tar order;
    a sample's key is its member name up to the first dot of the file name, as WebDataset groups them."""
    samples = []
    for shard in sorted(folder.glob("*.tar")):
        grouped: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if dot:
                    grouped.setdefault(f"{directory}/{stem}" if directory else stem, {})[ext.lower()] = member
        samples += [(shard, key, members) for key, members in grouped.items()]
    return samples


def _tar_text(shard: Path, member: tarfile.TarInfo) -> str:
    with shard.open("rb") as file:
        file.seek(member.offset_data)
        return file.read(member.size).decode("utf-8")


def _tar_image(shard: Path, key: str, members: dict[str, tarfile.TarInfo]) -> tuple[Path, int, int, str]:
    ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if ext is None:
        raise ValueError(f"{shard}: sample {key} has no image member ({', '.join(IMAGE_EXTENSIONS)})")
    return shard, members[ext].offset_data, members[ext].size, members[ext].name


def load_classification(
    dataset: str, templates_file: str | None, size: int = 0, image_size: int = 0
) -> tuple[ClassificationSet, list[str] | None]:
    """The classification set named by `dataset` (a folder, or a SHAPES_TASKS name rendered at `image_size`,
    `size` images) and the templates to use: `templates_file`, else the dataset's, else None (the built-in ones).

    ValueError (one line) for a class folder without images, a classnames.txt whose length differs from the
    classes, a label outside them, or a templates file without `{c}`.
    """
    if dataset in SHAPES_TASKS:
        data = _shapes_classification(SHAPES_TASKS[dataset], size, image_size)
    else:
        root = Path(dataset)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder {root} does not exist (or name one of {sorted(SHAPES_TASKS)})")
        shards = _shard_folder(root)
        data = _shard_classification(root, shards) if shards else _folder_classification(root)
    templates = read_templates(Path(templates_file)) if templates_file else data.templates
    return data, templates


def _own_templates(root: Path) -> list[str] | None:
    return read_templates(root / TEMPLATES_FILE) if (root / TEMPLATES_FILE).is_file() else None


def _classnames(root: Path, count: int, default: list[str]) -> list[str]:
    """Names from root/classnames.txt (one per line, in class-index order), else `default`."""
    path = root / CLASSNAMES_FILE
    if not path.is_file():
        return default
    names = _lines(path)
    if len(names) != count:
        raise ValueError(f"{path} names {len(names)} classes but the dataset has {count}; give one name per class")
    return names


def _folder_classification(root: Path) -> ClassificationSet:
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root} holds neither class folders nor *.tar shards")
    paths, labels = [], []
    for label, folder in enumerate(folders):
        images = sorted(p for p in folder.iterdir() if _is_image(p))
        if not images:
            raise ValueError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += images
        labels += [label] * len(images)
    names = _classnames(root, len(folders), [f.name for f in folders])
    return ClassificationSet(ImageFiles(paths), labels, names, _own_templates(root))


def _shard_classification(root: Path, shards: Path) -> ClassificationSet:
    if not (root / CLASSNAMES_FILE).is_file():
        raise ValueError(f"WebDataset shards in {shards} need {root / CLASSNAMES_FILE}, one class name per line")
    names = _lines(root / CLASSNAMES_FILE)
    members, labels = [], []
    for shard, key, sample in _tar_samples(shards):
        if "cls" not in sample:
            raise ValueError(f"{shard}: sample {key} has no cls member (its class index)")
        label = int(_tar_text(shard, sample["cls"]).strip())
        if not 0 <= label < len(names):
            raise ValueError(f"{shard}: sample {key} has class {label}, but {CLASSNAMES_FILE} names {len(names)}")
        members.append(_tar_image(shard, key, sample))
        labels.append(label)
    return ClassificationSet(TarMembers(members), labels, names, _own_templates(root))


def _shapes_classification(attribute: str, size: int, image_size: int) -> ClassificationSet:
    """Single-shape held-out images, labelled by the shape's kind or colour (read back from the caption, which is
    "a {size} {colour} {shape} {region}")."""
    names = list(SHAPES if attribute == "shape" else COLOURS)
    word = 3 if attribute == "shape" else 2
    labels = [names.index(render_shapes("eval", i, image_size, 1)[1].split()[word]) for i in range(size)]
    if attribute == "shape":
        templates = [f"a {s} {c} {{c}}" for s in SIZES for c in COLOURS]
    else:
        templates = [f"a {s} {{c}} {shape}" for s in SIZES for shape in SHAPES]
    return ClassificationSet(ShapesImages(size, image_size), labels, names, templates)


def load_retrieval(dataset: str) -> RetrievalSet:
    """Images with several captions each: WebDataset shards whose `txt` member holds one caption per line, or a
    folder of images with captions.json ({"image file name": ["caption", ...], ...}, in that order)."""
    root = Path(dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    shards = _shard_folder(root)
    if shards:
        members, captions = [], []
        for shard, key, sample in _tar_samples(shards):
            if "txt" not in sample:
                raise ValueError(f"{shard}: sample {key} has no txt member (its captions, one per line)")
            members.append(_tar_image(shard, key, sample))
            captions.append(_captions(_tar_text(shard, sample["txt"]).splitlines(), f"{shard}: sample {key}"))
        return RetrievalSet(TarMembers(members), captions)
    index = root / CAPTIONS_FILE
    if not index.is_file():
        raise ValueError(f"{root} holds neither *.tar shards nor {CAPTIONS_FILE}")
    table = json.loads(index.read_text(encoding="utf-8"))
    if not isinstance(table, dict) or not table:
        raise ValueError(f'{index} must map image file names to caption lists: {{"a.png": ["a cat", ...]}}')
    paths = [root / name for name in table]
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        raise FileNotFoundError(f"{index} names {missing.name}, which is not in {root}")
    captions = [_captions(list(texts), f"{index}: {name}") for name, texts in table.items()]
    return RetrievalSet(ImageFiles(paths), captions)


def _captions(texts: list[str], where: str) -> list[str]:
    kept = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not kept:
        raise ValueError(f"{where} has no caption")
    return kept
