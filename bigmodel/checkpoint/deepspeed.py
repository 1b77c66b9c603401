"""DeepSpeed checkpoints converted into bigmodel's sharded (DCP) format, which the native engine and the offline tools
read. The deepspeed engine saves and loads them itself; this module only reads their files.

A checkpoint folder of the deepspeed engine (`<out_dir>/checkpoints/step_XXXXXXXX/`) is a DeepSpeed checkpoint
directory, so DeepSpeed's own tools accept it too (`python step_XXXXXXXX/zero_to_fp32.py step_XXXXXXXX OUT`):
  global_step<N>/         DeepSpeed's files: mp_rank_00_model_states.pt (ZeRO 0-2) or one
                          zero_pp_rank_<r>_mp_rank_00_model_states.pt per rank (ZeRO-3), and one
                          zero_pp_rank_<r>_mp_rank_00_optim_states.pt per rank (ZeRO 1-3)
  latest                  DeepSpeed's pointer to that tag
  zero_to_fp32.py, ...    DeepSpeed's recovery scripts (ZeRO 1-3)
  manifest.json           format "bigmodel-deepspeed-1", step, extra (data position, config), layout, DeepSpeed tag
                          and version, checksum of every file: `--resume auto`, `keep`, `latest` and integrity checks
                          work as for the native engine's checkpoints
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem
from tqdm import tqdm

from bigmodel.checkpoint.manifest import MANIFEST_FILE, checksums, read_manifest, require_fields, verify_manifest
from bigmodel.checkpoint.records import pack_hyperparameters
from bigmodel.checkpoint.run import LATEST_FILE, resolve_checkpoint, step_folder
from bigmodel.checkpoint.safe import single_process
from bigmodel.checkpoint.sharded import FORMAT as SHARDED_FORMAT
from bigmodel.checkpoint.sharded import RawRecordWriter

FORMAT = "bigmodel-deepspeed-1"
"""The manifest format of the deepspeed engine's checkpoints."""
MOMENTS = ("exp_avg", "exp_avg_sq")


def _load(file: Path) -> dict[str, Any]:
    """A DeepSpeed checkpoint file, memory-mapped (tensors are read from disk only where they are sliced) and
    unpickled with torch's weights-only loader: besides tensors and plain data it builds only the three DeepSpeed
    records these files hold (loss scaler, ZeRO stage enum, fragment address), so a crafted file runs no code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0]
        raise ValueError(
            f"{file} holds an object this converter does not load ({reason}); nothing of it was run"
        ) from None


def _rank_files(folder: Path, suffix: str) -> list[Path]:
    """`*zero_pp_rank_<r>_mp_rank_00_<suffix>` files of `folder` in rank order (numeric, so rank 10 follows 9)."""
    pattern = re.compile(rf".*zero_pp_rank_(\d+)_mp_rank_00_{suffix}$")
    found = {int(m.group(1)): f for f in folder.iterdir() if (m := pattern.fullmatch(f.name))}
    return [found[r] for r in sorted(found)]


class ZeroCheckpoint:
    """The whole fp32 parameters and AdamW state of a DeepSpeed checkpoint written by the deepspeed engine (ZeRO
    0-3, any number of ranks), produced one tensor at a time.

    Every rank's files are memory-mapped; `tensor(name, kind)` slices the pieces of one parameter (its fp32 master
    value, `exp_avg` or `exp_avg_sq`) out of the ranks' flat partitions and joins them, so memory holds about one
    tensor beyond what the operating system caches. Parameters are grouped as DeepSpeed flattened them (bigmodel's
    two AdamW groups, or ZeRO-3's sub-groups of them): `groups[g]` maps names to shapes, `hyper[g]` holds the group's
    AdamW hyper-parameters, `steps[g]` its step count.
    """

    def __init__(self, folder: Path, stage: int):
        self.stage = stage
        model_files = _rank_files(folder, "model_states.pt") if stage == 3 else [folder / "mp_rank_00_model_states.pt"]
        if not model_files or not model_files[0].is_file():
            raise FileNotFoundError(f"{folder} holds no DeepSpeed model states file; is it a DeepSpeed checkpoint?")
        self.states = _load(model_files[0])
        if self.states.get("frozen_param_shapes") or self.states.get("shared_params"):
            raise ValueError(f"{folder}: frozen or shared parameters are not supported by this conversion")
        self.scheduler = self.states["lr_scheduler"]
        if stage == 0:
            self._init_stage0()
        else:
            self._init_partitioned(folder)

    def _init_stage0(self) -> None:
        from bigmodel.optim import decays

        module, optim = self.states["module"], self.states["optimizer"]
        # torch numbers the parameters of its state_dict through the groups in order; bigmodel's groups are the
        # decayed parameters, then the others, each in module order (bigmodel.optim.build_optimizer).
        order = [[n for n, t in module.items() if decays(n, t) == wanted] for wanted in (True, False)]
        self.groups = [{n: module[n].shape for n in names} for names in order]
        self.hyper = [{k: v for k, v in g.items() if k != "params"} for g in optim["param_groups"]]
        index = {n: i for i, n in enumerate(order[0] + order[1])}
        self._stage0 = (module, optim["state"], index)
        self.steps = [optim["state"][index[names[0]]]["step"] for names in order]

    def _init_partitioned(self, folder: Path) -> None:
        files = _rank_files(folder, "optim_states.pt")
        if not files:
            raise FileNotFoundError(f"{folder} holds no zero_pp_rank_*_optim_states.pt files; is it ZeRO 1-3?")
        optims = [_load(f)["optimizer_state_dict"] for f in files]
        self.world = len(optims)
        if self.stage == 3:
            flats = [o["fp32_flat_groups"] for o in optims]
            base = [o["optimizer_state_dict"] for o in optims]
        else:
            flats = [o["single_partition_of_fp32_groups"] for o in optims]
            base = [o["base_optimizer_state"] for o in optims]
            self.slices = [o["param_slice_mappings"] for o in optims]
        self.groups = [dict(shapes) for shapes in self.states["param_shapes"]]
        self.hyper = [{k: v for k, v in g.items() if k != "params"} for g in base[0]["param_groups"]]
        self.steps = [base[0]["state"][g]["step"] for g in range(len(self.groups))]
        # flat[kind][rank][group]: one rank's flat partition of one group's fp32 values or moments.
        self.flat = {"param": flats} | {
            k: [[b["state"][g][k] for g in range(len(self.groups))] for b in base] for k in MOMENTS
        }
        if self.stage == 3:
            self.offsets = [self._stage3_offsets(g, flats[0][g].numel()) for g in range(len(self.groups))]

    def _stage3_offsets(self, group: int, available: int) -> dict[str, int]:
        """Where each parameter's partition starts in every rank's flat buffer: ZeRO-3 splits each parameter into
        `world` equal parts (the last one padded) and concatenates a rank's parts in parameter order."""
        offsets, offset = {}, 0
        for name, shape in self.groups[group].items():
            offsets[name] = offset
            offset += math.ceil(math.prod(shape) / self.world)
        if offset != available:
            raise ValueError(
                f"ZeRO-3 group {group}: partitions add up to {offset} elements, the files hold {available}"
            )
        return offsets

    def tensor(self, group: int, name: str, kind: str) -> torch.Tensor:
        """The whole fp32 tensor of parameter `name` (in group `group`): kind "param", "exp_avg" or "exp_avg_sq"."""
        shape = self.groups[group][name]
        numel = math.prod(shape)
        if self.stage == 0:
            module, state, index = self._stage0
            return (module[name] if kind == "param" else state[index[name]][kind]).float().reshape(shape)
        flat = self.flat[kind]
        if self.stage == 3:
            size, start = math.ceil(numel / self.world), self.offsets[group][name]
            pieces = [flat[r][group].narrow(0, start, size) for r in range(self.world)]
        else:
            pieces = [
                flat[r][group].narrow(0, where.start, where.numel)
                for r in range(self.world)
                if (where := self.slices[r][group].get(name)) is not None
            ]
        joined = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if joined.numel() < numel:
            raise ValueError(f"parameter {name}: the partitions hold {joined.numel()} of its {numel} elements")
        return joined[:numel].float().reshape(shape)


class _StreamingSavePlanner(DefaultSavePlanner):
    """DCP's planner, fed placeholders (right shape and dtype, one element of storage) for the tensors in `produce`:
    each real tensor is made only when the writer asks for it, so the save holds one tensor at a time."""

    def __init__(self, produce: dict[str, Callable[[], torch.Tensor]], progress: tqdm):
        super().__init__()
        self.produce = produce
        self.progress = progress

    def resolve_data(self, write_item: WriteItem) -> Any:
        make = self.produce.pop(write_item.index.fqn, None)
        if make is None:
            return super().resolve_data(write_item)
        self.progress.update()
        return make()


def _placeholder(shape: torch.Size) -> torch.Tensor:
    return torch.empty((), dtype=torch.float32).expand(shape)


def from_deepspeed(src: Path, out: Path, progress: bool = True) -> Path:
    """Convert the deepspeed engine's checkpoint at `src` (a step_* folder, a checkpoints/ folder or a run
    directory, ZeRO 0-3 from any number of ranks) into a bigmodel run directory `out` and return its checkpoint.

    `out` gets config.yaml (the saved config with engine=native and train.out_dir=out) and
    checkpoints/step_XXXXXXXX/ in the sharded format with the fp32 weights, AdamW's moments, step counts and
    hyper-parameters, the LR schedule and the data position: `bigmodel eval OUT`, `bigmodel ckpt
    inspect/consolidate/export-hf OUT` and `bigmodel train --config OUT/config.yaml --resume OUT` (native engine,
    any layout) read it. Streams one tensor at a time from memory-mapped files. ValueError (one line) if `src` is
    not a deepspeed-engine checkpoint, fails its checksums, or `out` is not empty.
    """
    from bigmodel.config.load import config_from_dict, save_config

    src, out = resolve_checkpoint(src), Path(out)
    manifest = read_manifest(src)
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint {src} has format {manifest.get('format')}, not a deepspeed-engine checkpoint ({FORMAT}); "
            "it needs no conversion"
        )
    manifest = read_manifest(src, "step", "extra", "layout", "world_size", "deepspeed")
    saved = require_fields(manifest["deepspeed"], ("tag", "zero_stage"), f"{src / MANIFEST_FILE}'s deepspeed")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; convert into a new directory")
    verify_manifest(src)
    reader = ZeroCheckpoint(src / saved["tag"], saved["zero_stage"])

    config = json.loads(json.dumps(manifest["extra"]["config"]))
    config["engine"] = "native"
    config["train"]["out_dir"] = str(out)
    cfg = config_from_dict(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    save_config(cfg, out / "config.yaml")

    model: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    produce: dict[str, Callable[[], torch.Tensor]] = {}
    for group, shapes in enumerate(reader.groups):
        for name, shape in shapes.items():
            model[name] = _placeholder(shape)
            produce[f"model.{name}"] = lambda g=group, n=name: reader.tensor(g, n, "param")
            optim[f"state.{name}.step"] = torch.as_tensor(reader.steps[group]).detach().clone().float()
            for kind in MOMENTS:
                optim[f"state.{name}.{kind}"] = _placeholder(shape)
                produce[f"optim.state.{name}.{kind}"] = lambda g=group, n=name, k=kind: reader.tensor(g, n, k)
            optim.update({f"param_groups.{name}.{k}": v for k, v in reader.hyper[group].items()})
    optim = pack_hyperparameters(optim)

    step = manifest["step"]
    path = step_folder(out, step)
    tmp = path.parent / f".tmp_{path.name}"
    with tqdm(total=len(produce), desc="convert", unit="tensor", disable=not progress, file=sys.stderr) as bar:
        state = {"model": model, "optim": optim, "scheduler": reader.scheduler}
        with single_process():  # a process of its own, even where a process group exists
            planner = _StreamingSavePlanner(produce, bar)
            dcp.save(state, storage_writer=RawRecordWriter(tmp), planner=planner, no_dist=True)
    extra = manifest["extra"] | {"config": config, "converted_from": str(src)}
    converted = {
        "format": SHARDED_FORMAT,
        "byteorder": sys.byteorder,
        "step": step,
        "extra": extra,
        "layout": manifest["layout"],
        "world_size": manifest["world_size"],
        "torch": torch.__version__,
        "files": checksums(tmp),
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(converted, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    (path.parent / LATEST_FILE).write_text(path.name, encoding="utf-8")
    return path
