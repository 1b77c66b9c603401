"""Process-level settings for a run: threads, seeds and determinism."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def configure_threads(requested: int, procs_on_node: int = 1) -> int:
    """Set torch's intra-op threads: `requested`, or (0) the usable cores shared among this node's processes."""
    if requested == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        requested = max(1, cores // max(1, procs_on_node))
    torch.set_num_threads(requested)
    return requested


def seed_everything(seed: int) -> None:
    """Seed the global generators. Weights and data draw from their own seeded generators; this covers dropout."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels only (bit-identical reruns), or the fastest ones."""
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
