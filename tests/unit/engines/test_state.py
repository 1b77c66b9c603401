"""The engine state a checkpoint holds (NativeEngine.state_dict, bigmodel.engines.state) is torch's flattened
`get_state_dict` form, built without torch's helpers, and loads both in place and from another engine's tensors."""

from __future__ import annotations

import copy
import os
import re
import sys

import pytest
import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from bigmodel.checkpoint.records import pack_hyperparameters, unpack_hyperparameters
from bigmodel.checkpoint.safe import SafeLoadPlanner, read_dcp_metadata
from bigmodel.checkpoint.sharded import load_sharded, save_sharded
from bigmodel.config import load_config
from bigmodel.data import build_train_loader
from bigmodel.engines import build_engine
from bigmodel.engines.state import parts_optimizer_state
from bigmodel.parallel.context import setup_parallel
from bigmodel.train.loop import split_microbatches
from tests.distributed.checkpoint.ckpt_worker import ROOT


def trained_engine(seed: int, steps: int, width: int = 32):
    overrides = [f"--model.{tower}_width={width}" for tower in ("vision", "text")]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["--log.wandb=disabled", f"--train.seed={seed}", *overrides])
    engine = build_engine(cfg, setup_parallel(cfg))
    loader = iter(build_train_loader(cfg, 0, 1))
    for _ in range(steps):
        engine.train_step(split_microbatches(next(loader), 1))
    return engine


def unpacked(state: dict) -> dict:
    return {"model": state["model"], "optim": unpack_hyperparameters(state["optim"])}


def test_state_is_torch_helpers_form():
    engine = trained_engine(seed=0, steps=2)
    model, optim = get_state_dict(
        engine.model, engine.optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True)
    )
    ours = unpacked(engine.state_dict())
    theirs = unpacked({"model": model, "optim": pack_hyperparameters(optim)})
    for part in ("model", "optim"):
        assert ours[part].keys() == theirs[part].keys()
        for key, value in theirs[part].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(ours[part][key], value), key
            else:
                assert ours[part][key] == value, key


def test_packed_parts_state_is_pack_hyperparameters_of_the_flat_one():
    engine = trained_engine(seed=0, steps=1)
    parts = engine.model_parts()
    packed = parts_optimizer_state(parts, engine.optimizer, packed=True)
    flat = parts_optimizer_state(parts, engine.optimizer)
    assert packed.keys() == pack_hyperparameters(flat).keys()
    for key, value in pack_hyperparameters(flat).items():
        assert torch.equal(packed[key], value) if isinstance(value, torch.Tensor) else packed[key] == value, key


def test_parameters_of_a_group_share_one_hyper_parameter_record():
    state = trained_engine(seed=0, steps=1).state_dict()
    records = [value for key, value in state["optim"].items() if key.startswith("param_groups.")]
    assert all(isinstance(record, bytes) for record in records)
    assert len({id(record) for record in records}) == 2  # two groups: with and without weight decay


def test_loads_another_engines_tensors_by_copy():
    """A state that is not the engine's own (here another engine's) is copied into the model: nothing is shared."""
    source, target = trained_engine(seed=0, steps=2), trained_engine(seed=1, steps=0)
    assert not all(torch.equal(a, b) for a, b in zip(source.model.parameters(), target.model.parameters(), strict=True))
    target.load_state_dict(source.state_dict())
    for (name, a), b in zip(source.model.named_parameters(), target.model.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert a.data_ptr() != b.data_ptr(), name
    theirs, ours = unpacked(source.state_dict()), unpacked(target.state_dict())
    for key, value in theirs["optim"].items():
        mine = ours["optim"][key]
        assert torch.equal(mine, value) if isinstance(value, torch.Tensor) else mine == value, key
    assert target.scheduler.state_dict() == source.scheduler.state_dict()


def test_own_state_loads_in_place():
    """Filling the engine's own state dict changes the model and optimizer directly (what dcp.load does)."""
    engine = trained_engine(seed=0, steps=1)
    state = engine.state_dict()
    for tensor in [*state["model"].values(), *(v for v in state["optim"].values() if isinstance(v, torch.Tensor))]:
        tensor.fill_(0.5)
    engine.load_state_dict(state)
    assert all(bool((p == 0.5).all()) for p in engine.model.parameters())
    moments = [s[k] for s in engine.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq", "step")]
    assert moments and all(bool((m == 0.5).all()) for m in moments)


def test_saves_of_different_models_in_one_process_each_load_back(tmp_path):
    """DCP's plan cache (save_sharded reuses the last save's plan while the state's structure is unchanged) must not
    carry one model's plan into another's save."""
    small, wide = trained_engine(seed=0, steps=1), trained_engine(seed=1, steps=1, width=48)
    for name, engine in (("a", small), ("b", wide), ("c", small), ("d", wide)):
        save_sharded(tmp_path / name, engine, {"step": 1})
    for name, engine in (("a", small), ("b", wide), ("c", small), ("d", wide)):
        fresh = trained_engine(seed=2, steps=0, width=engine.cfg.model.text_width)
        load_sharded(tmp_path / name, fresh)
        for (key, a), b in zip(engine.model.named_parameters(), fresh.model.parameters(), strict=True):
            assert torch.equal(a, b), (name, key)


def _plan(planner, state, metadata):
    planner.set_up_planner(copy.copy(state), metadata, is_coordinator=True)
    key = lambda item: (item.dest_index.fqn, tuple(item.dest_index.offset or ()), item.type.value)  # noqa: E731
    return [
        (item.type, item.dest_index, item.dest_offsets, item.storage_index, item.storage_offsets, item.lengths)
        for item in sorted(planner.create_local_plan().items, key=key)
    ]


def test_load_plan_is_dcps(tmp_path):
    """SafeLoadPlanner's shortcut for tensors stored whole gives DCP's own plan, item for item; a tensor stored in
    pieces that do not match the local one (a reshard) is planned by DCP."""
    engine = trained_engine(seed=0, steps=1)
    save_sharded(tmp_path / "ckpt", engine, {"step": 1})
    metadata = read_dcp_metadata(tmp_path / "ckpt" / ".metadata")
    state = engine.state_dict()
    ours = _plan(SafeLoadPlanner(), state, metadata)
    assert ours == _plan(DefaultLoadPlanner(), state, metadata)
    assert sum(item[0] == LoadItemType.TENSOR for item in ours) > 100
    name = next(key for key in metadata.state_dict_metadata if key.endswith("mlp.fc1.weight"))
    stored = metadata.state_dict_metadata[name]
    half = stored.size[0] // 2  # the tensor as two row blocks, as 2-way FSDP stores it
    stored.chunks = [
        ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([half, stored.size[1]])),
        ChunkStorageMetadata(torch.Size([half, 0]), torch.Size([stored.size[0] - half, stored.size[1]])),
    ]
    split = [item for item in _plan(SafeLoadPlanner(), state, metadata) if item[1].fqn.endswith(name)]
    assert split == [item for item in _plan(DefaultLoadPlanner(), state, metadata) if item[1].fqn.endswith(name)]
    assert len(split) == 2


def test_load_restores_the_interpreters_switch_interval(tmp_path):
    """A resume prefetches its shard on a thread and shortens the GIL switch interval meanwhile; the interval is the
    caller's again afterwards, also when the load fails."""
    engine = trained_engine(seed=0, steps=1)
    save_sharded(tmp_path / "ckpt", engine, {"step": 1})
    before = sys.getswitchinterval()
    assert load_sharded(tmp_path / "ckpt", engine) == {"step": 1}
    assert sys.getswitchinterval() == before
    shard = tmp_path / "ckpt" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match="is cut short"):
        load_sharded(tmp_path / "ckpt", engine)
    assert sys.getswitchinterval() == before


def test_records_are_stored_smallest_first(tmp_path):
    """RawRecordWriter stores non-tensor items first, then tensors by size, so that a load meets its many small
    records while the disk still reads the large ones (sharded._stored_bytes)."""
    save_sharded(tmp_path / "ckpt", trained_engine(seed=0, steps=1), {"step": 1})
    metadata = read_dcp_metadata(tmp_path / "ckpt" / ".metadata")
    by_offset = sorted(metadata.storage_data.items(), key=lambda item: item[1].offset)
    sizes = []
    for index, _ in by_offset:
        stored = metadata.state_dict_metadata[index.fqn]
        chunk = getattr(stored, "chunks", None)
        sizes.append(0 if chunk is None else chunk[0].sizes.numel() * stored.properties.dtype.itemsize)
    assert sizes == sorted(sizes) and sizes[0] == 0 and sizes[-1] > 1000, sizes[:5]


def test_a_resume_checks_its_own_shard_as_it_loads_it(tmp_path, monkeypatch):
    """Resuming in the layout that saved, a rank's own shard file is hashed by the load's prefetch as it reads the
    file, not in a pass of its own before (read once, not twice); a corrupt or truncated shard still stops the resume
    with verify_manifest's one-line error, also where the prefetch would have been skipped for memory."""
    from bigmodel.checkpoint import manifest
    from bigmodel.checkpoint.manifest import verify_checkpoint

    engine = trained_engine(seed=0, steps=1)
    ckpt = tmp_path / "ckpt"
    save_sharded(ckpt, engine, {"step": 1})
    hashed_first = []
    real_digest = manifest.file_digest
    monkeypatch.setattr(
        manifest, "file_digest", lambda file, algorithm: hashed_first.append(file.name) or real_digest(file, algorithm)
    )
    checked = verify_checkpoint(ckpt)
    assert checked == ["__0_0.distcp"] and hashed_first == [".metadata"]
    assert load_sharded(ckpt, engine, checked) == {"step": 1}

    shard = ckpt / "__0_0.distcp"
    good = shard.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF  # inside a tensor's bytes: it loads, and only the checksum can tell
    shard.write_bytes(bytes(data))
    line = f"checkpoint {ckpt}: __0_0.distcp does not match its xxh3_128 checksum in manifest.json"
    assert verify_checkpoint(ckpt) == checked  # the corrupt file is left to the load
    with pytest.raises(ValueError, match="^" + re.escape(line)):
        load_sharded(ckpt, engine, checked)
    assert load_sharded(ckpt, engine) == {"step": 1}  # unchecked, the same bytes load
    monkeypatch.setattr(os, "sysconf", lambda name: 1)  # no free memory: no prefetch, unless a file is to be hashed
    with pytest.raises(ValueError, match="^" + re.escape(line)):
        load_sharded(ckpt, engine, checked)
    shard.write_bytes(good[: len(good) // 2])  # fails to parse first ("cut short"): the checksum names the cause
    with pytest.raises(ValueError, match="^" + re.escape(line)):
        load_sharded(ckpt, engine, checked)
    shard.unlink()  # a missing own shard is found before anything loads, by every rank together
    with pytest.raises(ValueError, match=re.escape("__0_0.distcp is missing")):
        verify_checkpoint(ckpt)
