"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards of the model and the
optimizer state, and a checkpoint loads into any parallel layout (DCP reshards on load).

The saved state does not depend on the layout: parameters under the unsplit model's names (tensors, or DTensors
whose global shape is the parameter's), AdamW's state per parameter name in the flattened form of
`torch.distributed.checkpoint.state_dict` (`state.<name>.exp_avg`, ...; ZeroOptimizer converts its chunks to it)
with each parameter's hyper-parameters in one item (`param_groups.<name>`: see pack_hyperparameters), and the LR
schedule. Layout of one checkpoint folder:
  *.distcp, .metadata   DCP's shard files and index
  manifest.json         step, the caller's JSON `extra`, the layout saved from, torch version, sha256 of every file
A checkpoint is written to a temporary folder next to `path` and renamed to `path` once complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

if TYPE_CHECKING:
    from bigmodel.engines.native import NativeEngine

MANIFEST_FILE = "manifest.json"
FORMAT = "bigmodel-sharded-2"  # 2: hyper-parameters in one item per parameter (pack_hyperparameters)
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_HYPER_PREFIX = "param_groups."


def engine_state_dict(engine: NativeEngine) -> dict[str, Any]:
    """`{"model": ..., "optim": ..., "scheduler": ...}` of `engine`, keyed by the unsplit model's names.

    Tensors are this rank's shards (DTensors under tensor parallelism and FSDP) or whole tensors; they share storage
    with the model where they can, so `dcp.load` into this dict loads in place. Every rank calls it (a collective for
    ZeroOptimizer stages 1 and 2).
    """
    model: dict[str, Any] = {}
    for module in engine.model_parts():
        model.update(get_model_state_dict(module))
    if engine.zero is not None:
        optim = engine.zero.fqn_state_dict()
    elif len(engine.model_parts()) > 1:
        optim = parts_optimizer_state(engine)
    else:
        optim = get_optimizer_state_dict(engine.model_parts()[0], engine.optimizer, options=_OPTIM_OPTIONS)
    return {"model": model, "optim": pack_hyperparameters(optim), "scheduler": engine.scheduler.state_dict()}


def load_engine_state_dict(engine: NativeEngine, state: dict[str, Any]) -> None:
    """Put `state` (engine_state_dict's form, filled by `dcp.load`) into the engine's model, optimizer and schedule."""
    for module in engine.model_parts():
        own = set(get_model_state_dict(module))
        set_model_state_dict(module, {k: v for k, v in state["model"].items() if k in own})
    optim = unpack_hyperparameters(state["optim"])
    if engine.zero is not None:
        engine.zero.load_fqn_state_dict(optim)
    elif len(engine.model_parts()) > 1:
        load_parts_optimizer_state(engine, optim)
    else:
        set_optimizer_state_dict(engine.model_parts()[0], engine.optimizer, optim, options=_OPTIM_OPTIONS)
    engine.scheduler.load_state_dict(state["scheduler"])


def pack_hyperparameters(flat: dict[str, Any]) -> dict[str, Any]:
    """The flattened optimizer state with each parameter's hyper-parameters (`param_groups.<name>.<key>`: lr, betas,
    eps, ... about 12 per parameter) joined into one item `param_groups.<name>`, a tuple of (key, value) pairs.

    DCP stores every item as a separate record (a `torch.save` each, and an entry in the index); the hyper-parameters
    were three quarters of a checkpoint's items and up to a third of its save and half of its load time
    (docs/benchmarks.md, row g). A tuple of plain values is one item (DCP does not descend into tuples) and still
    loads with `torch.load(weights_only=True)`. Per parameter name, like the rest of the state, so the form does not
    depend on the layout.
    """
    packed: dict[str, Any] = {}
    hyper: dict[str, list[tuple[str, Any]]] = {}
    for key, value in flat.items():
        if key.startswith(_HYPER_PREFIX):
            name, _, field = key.removeprefix(_HYPER_PREFIX).rpartition(".")
            hyper.setdefault(name, []).append((field, value))
        else:
            packed[key] = value
    return packed | {_HYPER_PREFIX + name: tuple(pairs) for name, pairs in hyper.items()}


def unpack_hyperparameters(packed: dict[str, Any]) -> dict[str, Any]:
    """pack_hyperparameters undone: torch's flattened form, which the optimizers' state-dict loaders take."""
    flat: dict[str, Any] = {}
    for key, value in packed.items():
        if key.startswith(_HYPER_PREFIX):
            flat.update({f"{key}.{field}": v for field, v in value})
        else:
            flat[key] = value
    return flat


def _named_params(engine: NativeEngine) -> dict[int, str]:
    return {id(p): name for part in engine.model_parts() for name, p in part.named_parameters()}


def parts_optimizer_state(engine: NativeEngine) -> dict[str, Any]:
    """A plain AdamW's state over several model parts (pipeline stages on one rank) in the flattened form of
    `get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)`, which torch's helpers build for one module
    only. Moments are zeros and step 0 before the first step, so the form never depends on when it is taken."""
    names = _named_params(engine)
    flat: dict[str, Any] = {}
    for group in engine.optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        for param in group["params"]:
            name, state = names[id(param)], engine.optimizer.state.get(param, {})
            flat[f"state.{name}.step"] = state.get("step", torch.tensor(0.0)).detach().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                flat[f"state.{name}.{key}"] = state[key] if key in state else torch.zeros_like(param)
            flat.update({f"param_groups.{name}.{k}": v for k, v in hyper.items()})
    return flat


@torch.no_grad()
def load_parts_optimizer_state(engine: NativeEngine, flat: dict[str, Any]) -> None:
    """Restore parts_optimizer_state's form (saved in any layout) into the plain AdamW over several parts."""
    names = _named_params(engine)
    for group in engine.optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            engine.optimizer.state[param] = {
                "step": torch.as_tensor(flat[f"state.{name}.step"]).detach().clone().float(),
                **{key: flat[f"state.{name}.{key}"] for key in ("exp_avg", "exp_avg_sq")},
            }
        if group["params"]:  # hyper-parameters are per group: its first parameter's saved values stand for all
            first = names[id(group["params"][0])]
            for key in group.keys() - {"params"}:
                group[key] = flat[f"param_groups.{first}.{key}"]


class PendingSave:
    """A checkpoint being written. `wait()` returns its folder once complete; `done()` says whether it is.

    Rank 0 finishes it (checksums, manifest, rename to the final folder, then `on_complete(path)`) once DCP has
    written every rank's shards: in DCP's background thread for an async save, before save_sharded returns
    otherwise. Other ranks only wait for their own shards. Neither step runs a collective on the training group.
    """

    def __init__(self, tmp: Path, path: Path, manifest: dict[str, Any], on_complete: Callable[[Path], None] | None):
        self.tmp, self.path, self.manifest, self.on_complete = tmp, path, manifest, on_complete
        self.future: Future | None = None
        self._finished = threading.Event()
        self._error: BaseException | None = None

    def start_background(self, future: Future) -> None:
        self.future = future
        future.add_done_callback(lambda _: self._finish())

    def _finish(self) -> None:
        try:
            if self.future is not None:
                self.future.result()  # re-raises a failed write
            if _is_main():
                self.manifest["files"] = _checksums(self.tmp)
                (self.tmp / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2), encoding="utf-8")
                shutil.rmtree(self.path, ignore_errors=True)
                os.replace(self.tmp, self.path)
                if self.on_complete is not None:
                    self.on_complete(self.path)
        except BaseException as err:  # handed to the thread that waits
            self._error = err
        finally:
            self._finished.set()

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self) -> Path:
        self._finished.wait()
        if self._error is not None:
            raise RuntimeError(f"saving checkpoint {self.path} failed: {self._error}") from self._error
        return self.path


def save_sharded(
    path: str | Path, engine: NativeEngine, extra: dict[str, Any], on_complete: Callable[[Path], None] | None = None
) -> Path:
    """Write `engine`'s state to the folder `path` (replacing one there) and return it. Every rank calls it.

    `extra` (the step, data position, ...) must be JSON; it goes into manifest.json and `load_sharded` returns it.
    The shards are written to `.tmp_<name>` beside `path`, which rank 0 renames to `path` after every rank is done,
    then calls `on_complete(path)`.
    """
    pending = _start_save(Path(path), engine, extra, on_complete)
    dcp.save(engine_state_dict(engine), checkpoint_id=pending.tmp)
    if dist.is_initialized():
        dist.barrier()
    pending._finish()
    if dist.is_initialized():
        dist.barrier()
    return pending.wait()


def save_sharded_async(
    path: str | Path,
    engine: NativeEngine,
    extra: dict[str, Any],
    group: dist.ProcessGroup | None,
    on_complete: Callable[[Path], None] | None = None,
) -> PendingSave:
    """save_sharded in the background: the state is copied to host memory, then written by a thread while the
    caller trains on. `group` is a gloo process group used only for checkpoints (None in a single process), so
    the writer's collectives never interleave with training's. Call `.wait()` before the next save and before
    the process exits."""
    pending = _start_save(Path(path), engine, extra, on_complete)
    response = dcp.async_save(engine_state_dict(engine), checkpoint_id=pending.tmp, process_group=group)
    pending.start_background(getattr(response, "upload_completion", response))  # a Future, or one inside a response
    return pending


def _start_save(
    path: Path, engine: NativeEngine, extra: dict[str, Any], on_complete: Callable[[Path], None] | None
) -> PendingSave:
    """Check `extra`, prepare the manifest and an empty temporary folder (all ranks wait for it)."""
    manifest = {"format": FORMAT, "step": extra.get("step"), "extra": extra}
    try:
        json.dumps(manifest)
    except TypeError as err:
        raise TypeError(f"save_sharded: extra must be JSON ({err}); keep tensors in the engine state") from None
    manifest |= {"layout": asdict(engine.ctx.dims), "world_size": engine.ctx.env.world_size, "torch": torch.__version__}
    tmp = path.parent / f".tmp_{path.name}"
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    return PendingSave(tmp, path, manifest, on_complete)


def load_sharded(path: str | Path, engine: NativeEngine) -> dict[str, Any]:
    """Load the checkpoint at `path` into `engine`, whatever layout it was saved from, and return its `extra`.

    Every rank calls it; it does not check the files' checksums (verify_manifest does). A pickled object that is not
    plain checkpoint data raises UnsafeCheckpointError (a ValueError) without being run.
    """
    from bigmodel.checkpoint.safe import load_dcp

    path = Path(path)
    manifest = read_sharded_manifest(path)
    state = engine_state_dict(engine)
    load_dcp(state, path)  # never unpickles code from the checkpoint (bigmodel.checkpoint.safe)
    load_engine_state_dict(engine, state)
    return manifest["extra"]


def read_sharded_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the checkpoint at `path`; ValueError (one line) if it is not in this module's format."""
    manifest = read_manifest(path)
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint {path} has format {manifest.get('format')}, not {FORMAT}; a deepspeed-engine checkpoint "
            f"resumes with engine=deepspeed, or converts with `bigmodel ckpt from-deepspeed {path} OUT`"
        )
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest.json of the checkpoint folder `path`."""
    return json.loads((Path(path) / MANIFEST_FILE).read_text(encoding="utf-8"))


def verify_manifest(path: str | Path) -> None:
    """Raise ValueError naming the first file of the checkpoint at `path` that is missing, changed or unlisted."""
    path = Path(path)
    expected = read_manifest(path)["files"]
    for name, digest in expected.items():
        if not (path / name).is_file():
            raise ValueError(f"checkpoint {path}: {name} is missing; restore it or use an earlier checkpoint")
        if _sha256(path / name) != digest:
            raise ValueError(
                f"checkpoint {path}: {name} does not match its sha256 in {MANIFEST_FILE} (corrupt or changed); "
                "use an earlier checkpoint"
            )
    unlisted = sorted(set(_files(path)) - set(expected) - {MANIFEST_FILE})
    if unlisted:
        raise ValueError(f"checkpoint {path}: {unlisted[0]} is not listed in {MANIFEST_FILE}")


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _checksums(folder: Path) -> dict[str, str]:
    return {name: _sha256(folder / name) for name in _files(folder)}


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
