"""Turning (image, caption) pairs into training tensors, deterministically.

Everything random about a sample (augmentation, MLM masking, the patches that patch dropout keeps) is drawn from a
generator seeded by a key the caller passes, never from global RNG state, so a sample's tensors depend on its key and
dataset index only: not on the rank, worker or process that builds it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from bigmodel.config.schema import Config
from bigmodel.data.shards import BadSample
from bigmodel.data.tokenizer import CaptionTokenizer
from bigmodel.data.transforms import build_transform
from bigmodel.models.encoder import kept_patches

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of positions the MLM loss ignores (torch.nn.functional.cross_entropy's default ignore_index)."""
_MASK_FRACTION, _RANDOM_FRACTION = 0.8, 0.1
"""Of the tokens selected for MLM: 80% become [MASK], 10% a random ordinary token, the rest stay (BERT's recipe)."""


class PairSource(Protocol):
    """A numbered collection of (image, caption) pairs: `ShapesSource` or `IndexedShards`.

    A source may also have `prefetch(indices)`, called before a batch's `load` calls, to start reading them
    (`IndexedShards` fetches remote samples concurrently)."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, str]:
        """The (H, W, 3) uint8 image and non-empty caption of sample `index`; raises BadSample if unusable."""
        ...

    def sample_id(self, index: int) -> int:
        """The id the ledger records for sample `index` ((shard number << 32) | member number for shards)."""
        ...


def mask_tokens(
    ids: np.ndarray, tokenizer: CaptionTokenizer, probability: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """BERT-style masking of one (L,) id sequence: returns (masked ids, labels).

    Each ordinary token (one not in tokenizer.special_ids) is selected with `probability`, and at least one is when
    probability > 0; selected tokens become [MASK] (80%), a random ordinary token (10%) or stay (10%). Labels hold
    the original id at selected positions and IGNORE_INDEX elsewhere. A tokenizer without [MASK] selects nothing
    (the builders allow one only when the MLM loss weight is 0).
    """
    if tokenizer.mask_id is None:
        return ids.copy(), np.full_like(ids, IGNORE_INDEX)
    special = np.asarray(tokenizer.special_ids)
    candidates = ~np.isin(ids, special)
    selected = candidates & (rng.random(ids.shape) < probability)
    if probability > 0 and candidates.any() and not selected.any():
        selected[rng.choice(np.flatnonzero(candidates))] = True
    action = rng.random(ids.shape)
    masked = ids.copy()
    masked[selected & (action < _MASK_FRACTION)] = tokenizer.mask_id
    randomized = selected & (action >= _MASK_FRACTION) & (action < _MASK_FRACTION + _RANDOM_FRACTION)
    if randomized.any():
        draws = rng.integers(0, tokenizer.vocab_size - len(special), size=int(randomized.sum()))
        masked[randomized] = _ordinary_id(draws, special)
    return masked, np.where(selected, ids, IGNORE_INDEX)


def _ordinary_id(ranks: np.ndarray, special: np.ndarray) -> np.ndarray:
    """The ranks[i]-th id (from 0) that is not in the sorted array `special`: rank plus the special ids before it.

    special[j] - j ordinary ids precede special[j], so it comes before the rank-th ordinary id when that is <= rank.
    """
    return ranks + np.searchsorted(special - np.arange(len(special)), ranks, side="right")


class ImageTextDataset:
    """A `PairSource` seen as model inputs sized by cfg.model, masked with cfg.data.mlm_probability.

    Images go through cfg.data.transform (bigmodel.data.transforms); `augment` selects its training form (shapes:
    caption-preserving jitter; clip: random resized crop). Builders pass cfg.data.augment for training and False
    for evaluation. With `drop_patches` (training loaders) and model.patch_dropout > 0, each sample also gets
    `patch_keep`, the patches the image tower keeps (see `batch`). `source` is None for readers that fetch samples
    themselves and call `features`.
    """

    def __init__(
        self,
        source: PairSource | None,
        tokenizer: CaptionTokenizer,
        cfg: Config,
        augment: bool,
        drop_patches: bool = False,
    ) -> None:
        if cfg.model.channels not in (1, 3):
            raise ValueError(f"model.channels must be 1 (grey) or 3 (RGB) for image data, got {cfg.model.channels}")
        self.source = source
        self.tokenizer = tokenizer
        self.transform = build_transform(cfg, train=augment)
        self.context_length = cfg.model.context_length
        self.mlm_probability = cfg.data.mlm_probability
        self.num_patches = (cfg.model.image_size // cfg.model.patch_size) ** 2
        self.kept_patches = kept_patches(cfg.model) if drop_patches and cfg.model.patch_dropout > 0 else None
        """Patches each sample keeps (None: no patch dropout, every patch is seen)."""

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
        """(C, S, S) float32 model input from an (H, W, 3) uint8 image; draws its randomness from `rng`."""
        return self.transform(image, rng)

    def example(self, index: int, key: Sequence[int]) -> tuple[dict[str, np.ndarray], int]:
        """Features of sample `index` (or its substitute) and how many bad samples were skipped to find it.

        `key` (non-negative ints) seeds augmentation and masking: equal (index, key) give equal features.
        """
        used_index, image, caption, skipped = self._load_usable(index)
        features = self.features(image, caption, key)
        features["index"] = np.int64(used_index)
        features["sample_id"] = np.int64(self.source.sample_id(used_index))
        return features, skipped

    def features(self, image: np.ndarray, caption: str, key: Sequence[int]) -> dict[str, np.ndarray]:
        """Model inputs of one (H, W, 3) uint8 image and its caption, augmented and masked as seeded by `key`.

        The part of `example` after loading, for readers that fetch samples themselves (the streaming loader).
        """
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
        }
        if self.kept_patches is not None:
            # Drawn after the other draws, so switching patch dropout on changes nothing else about a sample.
            keep = rng.choice(self.num_patches, size=self.kept_patches, replace=False)
            features["patch_keep"] = np.sort(keep).astype(np.int64)
        return features

    def batch(self, indices: Sequence[int], keys: Sequence[Sequence[int]]) -> tuple[dict[str, torch.Tensor], int]:
        """Stacked features of `indices` (sample i keyed by keys[i]) and the number of bad samples skipped.

        Keys: pixel_values (B, C, H, W) float32; input_ids, attention_mask, mlm_input_ids, mlm_labels (B, L)
        int64; index (B,) int64, the dataset index each row came from (after substitution); sample_id (B,) int64,
        that row's `PairSource.sample_id`; under patch dropout, patch_keep (B, K) int64, the sorted indices of the K
        patches kept (`bigmodel.models.encoder.kept_patches`) among the (image_size / patch_size)^2.
        """
        prefetch = getattr(self.source, "prefetch", None)
        if prefetch is not None:
            prefetch(indices)
        examples = [self.example(index, key) for index, key in zip(indices, keys, strict=True)]
        batch = {name: torch.from_numpy(np.stack([f[name] for f, _ in examples])) for name in examples[0][0]}
        return batch, sum(skipped for _, skipped in examples)
