"""The embedded dataset: procedurally generated captioned images of coloured shapes.

An image is a dark, plain background with one to `max_shapes` shapes, each in its own cell of a 3x3 grid (so
shapes never overlap), and its caption names every shape in reading order:

    "a large red circle at the top left and a small blue square at the bottom"

A sample is a pure function of (split, index): every split draws from its own random stream under a fixed
dataset seed, so the held-out split is the same in every run and never overlaps the training stream.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Literal

import numpy as np

Split = Literal["train", "eval"]

DATASET_SEED = 20240611
"""Fixed seed of the embedded dataset; changing it changes every sample (and the held-out split)."""
_SPLIT_IDS: dict[str, int] = {"train": 0, "eval": 1}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 50),
    "cyan": (40, 210, 220),
    "magenta": (220, 60, 200),
    "orange": (245, 140, 30),
    "white": (235, 235, 235),
}
SIZES: dict[str, float] = {"small": 0.26, "large": 0.42}
"""Shape radius as a fraction of the grid cell's side."""
REGIONS: tuple[str, ...] = (
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)
"""Phrases naming the cells of the 3x3 grid, row by row."""
_MAX_JITTER = 0.6
"""A shape's centre moves by at most this fraction of the free space between it and its cell's border."""
_BACKGROUND_MAX = 40
"""Background grey level is drawn uniformly from [0, this]."""


def _circle(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    return r - np.sqrt(dx * dx + dy * dy)


def _square(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    # A slightly smaller half-side than the circle's radius keeps both shapes' areas alike.
    return 0.85 * r - np.maximum(np.abs(dx), np.abs(dy))


def _triangle(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    # Equilateral, pointing up, circumradius R; its centroid sits R/4 below the centre so that its bounding box
    # (height 1.5 R) is centred on the shape's position.
    big_r = 1.15 * r
    px, py = dx, -(dy - big_r / 4)  # y up, origin at the centroid
    edge = np.maximum(np.maximum(-py, 0.866 * px + 0.5 * py), -0.866 * px + 0.5 * py)
    return big_r / 2 - edge


def _cross(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    half_width = 0.4 * r
    ax, ay = np.abs(dx), np.abs(dy)
    horizontal = np.minimum(r - ax, half_width - ay)
    vertical = np.minimum(half_width - ax, r - ay)
    return np.maximum(horizontal, vertical)


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
}
"""Each shape as a signed distance (in pixels, positive inside) from its outline, given offsets from its centre
and its radius; every shape fits in a square of half-side r."""
_COLOUR_NAMES, _SHAPE_NAMES, _SIZE_NAMES = tuple(COLOURS), tuple(SHAPES), tuple(SIZES)


def shapes_vocabulary() -> list[str]:
    """Every word a shapes caption can contain, sorted."""
    phrases = ["a", "and", *COLOURS, *SIZES, *SHAPES, *REGIONS]
    return sorted({word for phrase in phrases for word in phrase.split()})


@lru_cache(maxsize=8)
def _pixel_centres(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    centres = np.arange(image_size, dtype=np.float32) + 0.5
    return centres[None, :], centres[:, None]  # x (1, W), y (H, 1)


def render_shapes(split: Split, index: int, image_size: int, max_shapes: int) -> tuple[np.ndarray, str]:
    """Render sample `index` of `split`: an (image_size, image_size, 3) uint8 image and its caption.

    Shapes are drawn with anti-aliased edges from their signed distance, so any image_size renders correctly;
    below 16 pixels the small shapes are only a few pixels wide and hard to tell apart.
    """
    if max_shapes < 1 or max_shapes > len(REGIONS):
        raise ValueError(f"max_shapes must be in [1, {len(REGIONS)}], got {max_shapes}")
    rng = np.random.default_rng([DATASET_SEED, _SPLIT_IDS[split], index])
    count = int(rng.integers(1, max_shapes + 1))
    cells = np.sort(rng.choice(len(REGIONS), size=count, replace=False))
    image = np.full((image_size, image_size, 3), rng.integers(0, _BACKGROUND_MAX + 1), dtype=np.float32)
    x, y = _pixel_centres(image_size)
    cell_side = image_size / 3
    phrases = []
    for cell in cells:
        colour = _COLOUR_NAMES[rng.integers(len(COLOURS))]
        shape = _SHAPE_NAMES[rng.integers(len(SHAPES))]
        size = _SIZE_NAMES[rng.integers(len(SIZES))]
        radius = SIZES[size] * cell_side
        jitter = _MAX_JITTER * (cell_side / 2 - radius) * rng.uniform(-1.0, 1.0, size=2)
        cx = (cell % 3 + 0.5) * cell_side + jitter[0]
        cy = (cell // 3 + 0.5) * cell_side + jitter[1]
        coverage = np.clip(SHAPES[shape](x - cx, y - cy, radius) + 0.5, 0.0, 1.0)[..., None]  # (H, W, 1)
        image = image * (1.0 - coverage) + np.asarray(COLOURS[colour], dtype=np.float32) * coverage
        phrases.append(f"a {size} {colour} {shape} {REGIONS[cell]}")
    return np.round(image).astype(np.uint8), " and ".join(phrases)


class ShapesSource:
    """The first `size` samples of one split of the embedded dataset, as a source of (image, caption) pairs."""

    def __init__(self, split: Split, size: int, image_size: int, max_shapes: int) -> None:
        self.split = split
        self.size = size
        self.image_size = image_size
        self.max_shapes = max_shapes

    def __len__(self) -> int:
        return self.size

    def load(self, index: int) -> tuple[np.ndarray, str]:
        """The (H, W, 3) uint8 image and caption of sample `index`; never fails."""
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} out of range for {self.size} {self.split} samples")
        return render_shapes(self.split, index, self.image_size, self.max_shapes)

    def sample_id(self, index: int) -> int:
        """The ledger's id of sample `index`: the index itself (there are no shards)."""
        return index
