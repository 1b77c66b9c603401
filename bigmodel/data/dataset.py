"""Turning (image, caption) pairs into training tensors, deterministically.

Everything random about a sample (augmentation, MLM masking) is drawn from a generator seeded by a key the caller
passes, never from global RNG state, so a sample's tensors depend on its key and dataset index only: not on the
rank, worker or process that builds it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from bigmodel.config.schema import Config
from bigmodel.data.shards import BadSample
from bigmodel.data.tokenizer import CaptionTokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of positions the MLM loss ignores (torch.nn.functional.cross_entropy's default ignore_index)."""
_MASK_FRACTION, _RANDOM_FRACTION = 0.8, 0.1
"""Of the tokens selected for MLM: 80% become [MASK], 10% a random ordinary token, the rest stay (BERT's recipe)."""
_BRIGHTNESS = 0.1
"""Augmentation adds a brightness offset drawn from [-this, this] (pixel values in [0, 1])."""
_CONTRAST = 0.2
"""Augmentation scales contrast about the image mean by a factor drawn from [1 - this, 1 + this]."""
_NOISE_STD = 0.02
"""Standard deviation of the Gaussian pixel noise added by augmentation (pixel values in [0, 1])."""


class PairSource(Protocol):
    """A numbered collection of (image, caption) pairs: `ShapesSource` or `IndexedShards`."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, str]:
        """The (H, W, 3) uint8 image and non-empty caption of sample `index`; raises BadSample if unusable."""
        ...


def mask_tokens(
    ids: np.ndarray, tokenizer: CaptionTokenizer, probability: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """BERT-style masking of one (L,) id sequence: returns (masked ids, labels).

    Each ordinary (non-special) token is selected with `probability`, and at least one is when probability > 0;
    selected tokens become [MASK] (80%), a random ordinary token (10%) or stay (10%). Labels hold the original id
    at selected positions and IGNORE_INDEX elsewhere.
    """
    candidates = ids >= tokenizer.num_special
    selected = candidates & (rng.random(ids.shape) < probability)
    if probability > 0 and candidates.any() and not selected.any():
        selected[rng.choice(np.flatnonzero(candidates))] = True
    action = rng.random(ids.shape)
    masked = ids.copy()
    masked[selected & (action < _MASK_FRACTION)] = tokenizer.mask_id
    randomized = selected & (action >= _MASK_FRACTION) & (action < _MASK_FRACTION + _RANDOM_FRACTION)
    if randomized.any():
        masked[randomized] = rng.integers(tokenizer.num_special, tokenizer.vocab_size, size=int(randomized.sum()))
    return masked, np.where(selected, ids, IGNORE_INDEX)


def augment_image(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Caption-preserving jitter of an (H, W, C) float32 image in [0, 1]: brightness, contrast, pixel noise.

    Never flips, crops or rotates: captions name positions.
    """
    mean = image.mean()
    contrast = rng.uniform(1.0 - _CONTRAST, 1.0 + _CONTRAST)
    brightness = rng.uniform(-_BRIGHTNESS, _BRIGHTNESS)
    noise = rng.standard_normal(image.shape, dtype=np.float32) * _NOISE_STD
    return np.clip((image - mean) * contrast + mean + brightness + noise, 0.0, 1.0).astype(np.float32)


class ImageTextDataset:
    """A `PairSource` seen as model inputs sized by cfg.model, masked with cfg.data.mlm_probability.

    `augment` turns on `augment_image` (builders pass cfg.data.augment for training and False for evaluation).
    """

    def __init__(self, source: PairSource, tokenizer: CaptionTokenizer, cfg: Config, augment: bool) -> None:
        if cfg.model.channels not in (1, 3):
            raise ValueError(f"model.channels must be 1 (grey) or 3 (RGB) for image data, got {cfg.model.channels}")
        self.source = source
        self.tokenizer = tokenizer
        self.image_size = cfg.model.image_size
        self.channels = cfg.model.channels
        self.context_length = cfg.model.context_length
        self.mlm_probability = cfg.data.mlm_probability
        self.augment = augment

    def __len__(self) -> int:
        return len(self.source)

    def _load_usable(self, index: int) -> tuple[int, np.ndarray, str, int]:
        """The first usable sample at index, index + 1, ... (mod N): (its index, image, caption, skipped count).

        Substituting the next index (rather than, say, a random one) makes the choice a function of the dataset
        alone, so every rank and worker that meets a bad sample substitutes the same one.
        """
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                image, caption = self.source.load(candidate)
            except BadSample as error:
                logger.warning("skipping sample %d: %s", candidate, error)
                continue
            return candidate, image, caption, offset
        raise RuntimeError(f"none of the {len(self)} samples could be loaded; check the data source")

    def _pixels(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(C, H, W) float32 in [-1, 1] from an (H, W, 3) uint8 image."""
        if image.shape[:2] != (self.image_size, self.image_size) or self.channels == 1:
            pil = Image.fromarray(image).convert("L" if self.channels == 1 else "RGB")
            # Squash rather than crop: a crop could cut away a shape the caption names.
            pil = pil.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            image = np.asarray(pil).reshape(self.image_size, self.image_size, self.channels)
        pixels = image.astype(np.float32) / 255.0
        if self.augment:
            pixels = augment_image(pixels, rng)
        return ((pixels - 0.5) / 0.5).transpose(2, 0, 1)

    def example(self, index: int, key: Sequence[int]) -> tuple[dict[str, np.ndarray], int]:
        """Features of sample `index` (or its substitute) and how many bad samples were skipped to find it.

        `key` (non-negative ints) seeds augmentation and masking: equal (index, key) give equal features.
        """
        used_index, image, caption, skipped = self._load_usable(index)
        rng = np.random.default_rng(list(key))
        pixels = self._pixels(image, rng)
        ids, attention_mask = self.tokenizer.encode(caption, self.context_length)
        ids = np.asarray(ids, dtype=np.int64)
        mlm_ids, mlm_labels = mask_tokens(ids, self.tokenizer, self.mlm_probability, rng)
        features = {
            "pixel_values": pixels,
            "input_ids": ids,
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
            "mlm_input_ids": mlm_ids,
            "mlm_labels": mlm_labels,
            "index": np.int64(used_index),
        }
        return features, skipped

    def batch(self, indices: Sequence[int], keys: Sequence[Sequence[int]]) -> tuple[dict[str, torch.Tensor], int]:
        """Stacked features of `indices` (sample i keyed by keys[i]) and the number of bad samples skipped.

        Keys: pixel_values (B, C, H, W) float32; input_ids, attention_mask, mlm_input_ids, mlm_labels (B, L)
        int64; index (B,) int64, the dataset index each row came from (after substitution).
        """
        examples = [self.example(index, key) for index, key in zip(indices, keys, strict=True)]
        batch = {name: torch.from_numpy(np.stack([f[name] for f, _ in examples])) for name in examples[0][0]}
        return batch, sum(skipped for _, skipped in examples)
