"""Image preprocessing: (H, W, 3) uint8 images to (C, S, S) float32 model inputs.

Two transforms, chosen by data.transform:
- `ShapesTransform`: the embedded dataset's squash resize (no crop: captions name positions), scaled to [-1, 1],
  with caption-preserving jitter when augmenting.
- `ClipTransform`: OpenCLIP's preprocessing. Training: torchvision's RandomResizedCrop (its get_params algorithm,
  bicubic); evaluation: resize of the shortest side plus centre crop, both as torchvision does them on PIL images;
  then [0, 1] and per-channel normalisation.

Randomness comes only from the numpy Generator passed with each image (seeded by the sample's key), so a sample's
pixels never depend on the rank, worker or process that builds them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from bigmodel.config.schema import Config

CropBox = tuple[int, int, int, int]
"""(top, left, height, width) of a crop, in pixels of the image it is cut from."""

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
"""The (min, max) width / height of a training crop (torchvision's and OpenCLIP's RandomResizedCrop default)."""
_CROP_ATTEMPTS = 10
"""Random crop boxes tried before falling back to a centre crop (torchvision's RandomResizedCrop.get_params)."""
_BRIGHTNESS = 0.1
"""Augmentation adds a brightness offset drawn from [-this, this] (pixel values in [0, 1])."""
_CONTRAST = 0.2
"""Augmentation scales contrast about the image mean by a factor drawn from [1 - this, 1 + this]."""
_NOISE_STD = 0.02
"""Standard deviation of the Gaussian pixel noise added by augmentation (pixel values in [0, 1])."""


class ImageTransform(Protocol):
    """A function of one image and the sample's generator: (H, W, 3) uint8 -> (C, S, S) float32."""

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


def augment_image(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Caption-preserving jitter of an (H, W, C) float32 image in [0, 1]: brightness, contrast, pixel noise.

    Never flips, crops or rotates: captions name positions.
    """
    mean = image.mean()
    contrast = rng.uniform(1.0 - _CONTRAST, 1.0 + _CONTRAST)
    brightness = rng.uniform(-_BRIGHTNESS, _BRIGHTNESS)
    noise = rng.standard_normal(image.shape, dtype=np.float32) * _NOISE_STD
    return np.clip((image - mean) * contrast + mean + brightness + noise, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class ShapesTransform:
    """Squash-resize to size x size (bicubic; skipped when already that size in RGB), [0, 1], optional
    `augment_image`, then (x - 0.5) / 0.5. `channels` 1 converts to grey (PIL's "L"). Never crops: a crop could cut
    away a shape the caption names."""

    size: int
    channels: int
    augment: bool

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if image.shape[:2] != (self.size, self.size) or self.channels == 1:
            pil = Image.fromarray(image).convert("L" if self.channels == 1 else "RGB")
            pil = pil.resize((self.size, self.size), Image.Resampling.BICUBIC)
            image = np.asarray(pil).reshape(self.size, self.size, self.channels)
        pixels = image.astype(np.float32) / 255.0
        if self.augment:
            pixels = augment_image(pixels, rng)
        return ((pixels - 0.5) / 0.5).transpose(2, 0, 1)


def random_resized_crop_box(
    height: int,
    width: int,
    scale: Sequence[float],
    rng: np.random.Generator,
    ratio: Sequence[float] = CROP_RATIO,
) -> CropBox:
    """torchvision's RandomResizedCrop.get_params with numpy's generator: a box covering a fraction of the area
    drawn from `scale` with width / height log-uniform in `ratio`; after 10 boxes that do not fit, the centre crop
    of the whole image clamped to `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    if width / height < min(ratio):
        w, h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side `size` and the longer `int(size * long / short)` (the rule of both
    torchvision's Resize and transformers' shortest_edge)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def centre_crop_box(height: int, width: int, size: int) -> CropBox:
    """The size x size box in the middle of a height x width image, each margin split as torchvision's CenterCrop
    does: `round(margin / 2)`, Python's round (halves to even). An odd margin that is 3 mod 4 puts the box one
    pixel lower / further right than transformers' `margin // 2` (docs/data.md, preprocessing)."""
    return round((height - size) / 2.0), round((width - size) / 2.0), size, size


@dataclass(frozen=True)
class ClipTransform:
    """OpenCLIP's image transform at `size` pixels: `train` a random resized crop (area fraction in `scale`, aspect
    in `ratio`), otherwise resize of the shortest side and centre crop; bicubic on PIL's uint8 image, then
    (x / 255 - mean) / std per channel. `mean` and `std` hold one value per output channel (1: grey)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: bool
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = CROP_RATIO

    def __post_init__(self) -> None:
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise ValueError(
                f"clip transform: image_mean {list(self.mean)} and image_std {list(self.std)} need one value per "
                "channel (3 for RGB, 1 for grey); set data.image_mean and data.image_std to match model.channels"
            )

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pil, mode = Image.fromarray(image), "L" if len(self.mean) == 1 else "RGB"
        if pil.mode != mode:  # converting to the same mode would only copy the image
            pil = pil.convert(mode)
        if self.train:
            top, left, h, w = random_resized_crop_box(pil.height, pil.width, self.scale, rng, self.ratio)
            # Crop, then resize: resizing inside a box of the whole image would also read pixels outside the crop.
            pil = pil.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.Resampling.BICUBIC)
        else:
            height, width = shortest_side_size(pil.height, pil.width, self.size)
            top, left, h, w = centre_crop_box(height, width, self.size)
            pil = pil.resize((width, height), Image.Resampling.BICUBIC).crop((left, top, left + w, top + h))
        pixels = np.asarray(pil, dtype=np.float32).reshape(self.size, self.size, len(self.mean)) / np.float32(255.0)
        mean, std = np.asarray(self.mean, dtype=np.float32), np.asarray(self.std, dtype=np.float32)
        return ((pixels - mean) / std).transpose(2, 0, 1)


def build_transform(cfg: Config, train: bool) -> ImageTransform:
    """The transform data.transform names, sized by cfg.model. `train` selects ClipTransform's random crop and
    ShapesTransform's augmentation (builders pass data.augment for training and False for evaluation)."""
    size, data = cfg.model.image_size, cfg.data
    if data.transform == "shapes":
        return ShapesTransform(size, cfg.model.channels, augment=train)
    if len(data.image_mean) != cfg.model.channels:
        raise ValueError(
            f"data.image_mean has {len(data.image_mean)} values but model.channels={cfg.model.channels}; "
            "give one mean and one std per channel"
        )
    scale = (data.crop_scale[0], data.crop_scale[1])
    return ClipTransform(size, tuple(data.image_mean), tuple(data.image_std), train=train, scale=scale)
