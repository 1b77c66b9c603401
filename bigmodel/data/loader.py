"""Batches of the global sample stream, sliced per data-parallel rank, resumable to the exact next batch.

The stream: position p = 0, 1, 2, ... is dataset index perm_e[p % N] for epoch e = p // N, where perm_e is a
permutation of the N samples seeded by (seed, e). Step s covers positions [s*G, (s+1)*G) for global batch size
G, split into A microbatches (gradient accumulation) of M = G/A consecutive positions. Data-parallel rank r takes
the contiguous slice [r*M/dp, (r+1)*M/dp) of every microbatch, so microbatch m of every layout holds the same
samples as microbatch m of a single process. A sample's tensors are keyed by (seed, p) alone, so the ranks'
slices of a microbatch concatenate to the single-rank microbatch for any dp.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bigmodel.data.dataset import ImageTextDataset

_PERMUTATION_STREAM, _TRAIN_STREAM, _EVAL_STREAM = 0, 1, 2
"""First word of every seed key, so that permutations, training samples and eval samples never share a stream."""
EVAL_SEED = 0
"""Seed of the eval split's MLM masking: fixed, so eval MLM accuracy is comparable across runs and seeds."""


def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    """The order of the `size` dataset indices in `epoch` of the stream seeded by `seed`."""
    return np.random.default_rng([_PERMUTATION_STREAM, seed, epoch]).permutation(size)


class GlobalBatchLoader:
    """Infinite iterator over this rank's local batches of the global stream (see the module docstring).

    Iterating starts at `self.step` and yields the local batch of each step in turn (a dict as documented in
    `ImageTextDataset.batch`, global_batch_size // dp_size rows). `state_dict` after k batches lets a new loader
    resume at batch k; call `load_state_dict` before iterating. With num_workers > 0, background processes build
    whole local batches ahead of time; the batches are identical to num_workers = 0.
    """

    def __init__(
        self,
        dataset: ImageTextDataset,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        microbatches: int = 1,
    ) -> None:
        if global_batch_size % (dp_size * microbatches) != 0:
            raise ValueError(
                f"train.global_batch_size ({global_batch_size}) must split into {microbatches} microbatches over "
                f"{dp_size} data-parallel ranks; use a multiple of {dp_size * microbatches}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // dp_size
        self.microbatches = microbatches
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.num_workers = num_workers
        self.step = 0
        """Batches handed out so far; the next batch iteration yields is this step's."""
        self.skipped = 0
        """Bad samples this rank has replaced by a substitute so far (see `ImageTextDataset.example`)."""
        self._permutations: dict[int, np.ndarray] = {}

    def _dataset_index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch not in self._permutations:
            # Positions only move forward, so only the previous epoch (a batch may straddle the boundary) is kept.
            self._permutations = {e: p for e, p in self._permutations.items() if e == epoch - 1}
            self._permutations[epoch] = epoch_permutation(self.seed, epoch, len(self.dataset))
        return int(self._permutations[epoch][offset])

    def local_positions(self, step: int) -> list[int]:
        """Stream positions of this rank's batch of `step`: its slice of each microbatch, microbatch by microbatch."""
        micro = self.global_batch_size // self.microbatches
        share = micro // self.dp_size
        positions = []
        for m in range(self.microbatches):
            start = step * self.global_batch_size + m * micro + self.dp_rank * share
            positions.extend(range(start, start + share))
        return positions

    def local_batch(self, step: int) -> tuple[dict[str, torch.Tensor], int]:
        """This rank's batch of `step` and the number of bad samples skipped building it; a pure function.

        Split it into `microbatches` equal contiguous pieces to get this rank's share of each microbatch.
        """
        positions = self.local_positions(step)
        keys = [(_TRAIN_STREAM, self.seed, position) for position in positions]
        return self.dataset.batch([self._dataset_index(p) for p in positions], keys)

    def _batches(self) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        if self.num_workers == 0:
            return map(self.local_batch, itertools.count(self.step))
        # Each item of the DataLoader is one whole local batch, fetched by step number in order.
        return iter(
            DataLoader(
                _StepBatches(self),
                batch_size=None,
                sampler=itertools.count(self.step),
                num_workers=self.num_workers,
                # A generator of its own: seeding the workers must not draw from (and so shift) the global RNG
                # that the trainer seeds per step for dropout.
                generator=torch.Generator(),
            )
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch, skipped in self._batches():
            self.step += 1
            self.skipped += skipped
            yield batch

    def state_dict(self) -> dict[str, int]:
        """{"step": batches handed out, "skipped": bad samples substituted on this rank}."""
        return {"step": self.step, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from `state_dict()`; the layout (dp_size) may differ from the run that saved it."""
        self.step = int(state["step"])
        self.skipped = int(state["skipped"])


class _StepBatches(Dataset):
    """A loader's local batches as a map-style dataset indexed by step, for DataLoader workers."""

    def __init__(self, loader: GlobalBatchLoader) -> None:
        self.loader = loader

    def __getitem__(self, step: int) -> tuple[dict[str, torch.Tensor], int]:
        return self.loader.local_batch(step)


class EvalLoader:
    """Every sample of a held-out dataset, in index order, in batches of `batch_size` (the last may be smaller).

    No augmentation is applied by the builders; MLM masking is keyed by (EVAL_SEED, index), so each pass yields
    the same batches in every run. Batches are dicts as documented in `ImageTextDataset.batch`.
    """

    def __init__(self, dataset: ImageTextDataset, batch_size: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.skipped = 0
        """Bad samples replaced by a substitute, summed over all passes."""

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.dataset), self.batch_size):
            indices = range(start, min(start + self.batch_size, len(self.dataset)))
            batch, skipped = self.dataset.batch(indices, [(_EVAL_STREAM, EVAL_SEED, index) for index in indices])
            self.skipped += skipped
            yield batch
