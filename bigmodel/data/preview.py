"""A look at a dataset: the captions of its first samples and a PNG grid of their images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from bigmodel.data.dataset import PairSource
from bigmodel.data.shards import BadSample


def image_grid(images: Sequence[np.ndarray | None], tile: int = 128, columns: int = 8) -> np.ndarray:
    """(rows * tile, columns * tile, 3) uint8 grid of (H, W, 3) uint8 images, each scaled to tile x tile
    (nearest neighbour, so small images stay crisp); None leaves its tile black."""
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    grid = np.zeros((rows * tile, columns * tile, 3), dtype=np.uint8)
    for position, image in enumerate(images):
        if image is not None:
            row, column = divmod(position, columns)
            scaled = Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST)
            grid[row * tile : (row + 1) * tile, column * tile : (column + 1) * tile] = np.asarray(scaled)
    return grid


def preview(source: PairSource, count: int, start: int = 0, out: str | Path | None = None) -> list[str]:
    """Captions of samples start..start+count-1 of `source` (clipped to its length), "[bad sample: why]" for
    unusable ones; with `out`, also writes a PNG grid of their images there (black tiles for bad samples)."""
    if not 0 <= start < len(source):
        raise ValueError(f"start must be in [0, {len(source)}), got {start}")
    captions, images = [], []
    for index in range(start, min(start + count, len(source))):
        try:
            image, caption = source.load(index)
        except BadSample as error:
            image, caption = None, f"[bad sample: {error}]"
        captions.append(caption)
        images.append(image)
    if out is not None:
        Image.fromarray(image_grid(images)).save(out)
    return captions
