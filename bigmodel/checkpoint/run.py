"""A run's checkpoints: `<out_dir>/checkpoints/step_XXXXXXXX/` folders in the sharded format, a `latest` pointer
replaced atomically after each complete save, the newest `checkpoint.keep` kept, and finding the one to resume."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from bigmodel.checkpoint.io import Purger, remove_folder
from bigmodel.checkpoint.manifest import MANIFEST_FILE, read_manifest
from bigmodel.checkpoint.sharded import Checkpointable, PendingSave, save_sharded
from bigmodel.config.schema import KERNEL_FIELDS, ModelConfig, TrainConfig
from bigmodel.models.encoder import MultimodalEncoder
from bigmodel.models.locking import is_frozen

LATEST_FILE = "latest"


def step_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    state: Checkpointable,
    extra: dict[str, Any],
    keep: int,
    async_: bool = False,
    group: dist.ProcessGroup | None = None,
    purger: Purger | None = None,
) -> PendingSave:
    """Save `state` as checkpoint `step` of the run (every rank calls this; see save_sharded for `async_`, `group`
    and `purger`); once it is complete, the main rank points `latest` at it and deletes all but the newest `keep`."""
    folder = step_folder(run_dir, step)
    on_complete = point_latest(keep, purger)
    return save_sharded(folder, state, extra | {"step": step}, on_complete, async_, group, purger)


def point_latest(keep: int, purger: Purger | None = None) -> Callable[[Path], None]:
    """What completes a run's checkpoint, on the main rank: point `latest` at it (atomically) and delete all but the
    newest `keep` complete checkpoints (in the background with a purger: the ranks waiting at the next barrier do
    not wait for the filesystem). For the engines that write their own files."""

    def completed(path: Path) -> None:
        root = path.parent
        pointer = root / f".{LATEST_FILE}.tmp"
        pointer.write_text(path.name, encoding="utf-8")
        os.replace(pointer, root / LATEST_FILE)
        for old in complete_checkpoints(root)[:-keep]:
            remove_folder(old, purger)

    return completed


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under `root` that finished saving (they have a manifest), oldest first."""
    return sorted(p for p in Path(root).glob("step_*") if (p / MANIFEST_FILE).is_file())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a step_* folder, a checkpoints/ folder or a run directory (its newest complete
    checkpoint); FileNotFoundError (one line) if there is none."""
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    raise FileNotFoundError(
        f"no complete checkpoint at {path}; pass a run directory, its checkpoints/ folder or a step_* folder "
        f"containing {MANIFEST_FILE}"
    )


def find_resume_checkpoint(spec: str, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: `spec` "auto" means the newest complete one in this run (None if there is
    none yet); anything else is a path (see resolve_checkpoint). A newer, incomplete save (a crash while saving)
    is skipped, and that is said."""
    if spec != "auto":
        return resolve_checkpoint(spec)
    root = Path(run_dir) / "checkpoints"
    found = complete_checkpoints(root)
    newest = max((p.name.removeprefix(".tmp_") for p in root.glob("*step_*")), default=None)
    if found and newest is not None and newest > found[-1].name:
        print(f"note: skipping incomplete checkpoint {newest}; resuming from {found[-1].name}", file=sys.stderr)
    return found[-1] if found else None


def check_same_model(path: Path, model: dict[str, Any], objectives: tuple[str, ...]) -> None:
    """ValueError (one line, naming the first differing field) if the checkpoint at `path` holds another model.

    A field the saved config lacks (one added to ModelConfig since) counts as its default; the kernel choice
    (KERNEL_FIELDS) is not compared."""
    saved = read_manifest(path, "extra")["extra"].get("config")
    if saved is None:
        return
    defaults = dataclasses.asdict(ModelConfig())
    for key, value in model.items():
        there = saved["model"].get(key, defaults.get(key))
        if key not in KERNEL_FIELDS and there != value:
            raise ValueError(
                f"checkpoint {path} holds a different model: model.{key}={there!r} there, {value!r} here; resume "
                "with the config it was saved with"
            )
    saved_objectives = tuple(k for k, w in saved["train"]["loss_weights"].items() if w > 0)
    if saved_objectives != objectives:
        raise ValueError(
            f"checkpoint {path} trained the heads {saved_objectives}, this config {objectives}; set the same "
            "train.loss_weights (a weight of 0 drops a head)"
        )


LOCK_FIELDS = ("lock_image", "lock_text", "unlocked_blocks")


def check_same_locks(path: Path, model: ModelConfig, objectives: tuple[str, ...], train: TrainConfig) -> None:
    """ValueError (one line) if a parameter that the checkpoint's run froze (train.lock_image, lock_text,
    unlocked_blocks) trains in this one: the checkpoint holds no optimizer state for it. Freezing more than the
    saved run did resumes (the extra optimizer state is not read)."""
    saved = read_manifest(path, "extra")["extra"].get("config")
    if saved is None:
        return
    defaults = dataclasses.asdict(TrainConfig())
    there = SimpleNamespace(**{k: saved["train"].get(k, defaults[k]) for k in LOCK_FIELDS})
    with torch.device("meta"):
        names = [name for name, _ in MultimodalEncoder(model, objectives).named_parameters()]
    unfrozen = [n for n in names if is_frozen(n, model, there) and not is_frozen(n, model, train)]
    if unfrozen:
        was = " ".join(f"train.{k}={getattr(there, k)}" for k in LOCK_FIELDS)
        raise ValueError(
            f"checkpoint {path} was saved with {was}, so it holds no optimizer state for {unfrozen[0]} "
            f"(and {len(unfrozen) - 1} more parameters) that this run trains; resume with the same train.lock_image, "
            "train.lock_text and train.unlocked_blocks"
        )
