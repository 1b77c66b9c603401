"""Sharded checkpoints (bigmodel.checkpoint.sharded) load into other parallel layouts, optimizer state included.

One 4-process launch (workers/ckpt_worker.py) saves the tiny model after 2 AdamW steps at dp2 x tp2 with ZeRO-1
and loads it at dp2 x tp2 ZeRO-1, dp4 ZeRO-3 (FSDP2), tp2 x dp2 ZeRO-0 and dp4 ZeRO-2; this process loads it at
one process.
Every comparison is of whole (gathered) tensors by parameter name and is exact: loading copies the saved values and
recomputes nothing, and the continued step runs the same arithmetic on the same values in the same layout.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bigmodel.checkpoint.sharded import MANIFEST_FILE, engine_state_dict, load_sharded, verify_manifest
from bigmodel.config import load_config
from bigmodel.engines import build_engine
from bigmodel.parallel.context import setup_parallel
from tests.distributed.launch import run_worker
from tests.distributed.workers.ckpt_worker import LOADS, ROOT, deviation

EXACT = {"model_max_abs": 0.0, "moments_max_abs": 0.0, "step_max_abs": 0.0, "mismatched": []}
"""Loading copies values: every tensor equal to the saved one, every hyper-parameter and name the same."""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(the worker's measurements, the checkpoint folder), from one 4-process launch per test session."""
    folder = tmp_path_factory.mktemp("sharded")
    ckpt = folder / "step_2"
    return run_worker(4, "ckpt_worker.py", folder / "results.json", "--ckpt", str(ckpt)), ckpt


@pytest.mark.parametrize("layout", sorted(LOADS))
def test_loads_exactly_into_layout(run, layout):
    results, _ = run
    before, after = results[layout]["before"], results[layout]["after"]
    # A fresh engine is far from the trained state (2 Adam steps at lr ~1e-3; zero moments; another lr), so the
    # exact match below is the load's doing.
    assert before["model_max_abs"] > 1e-4 and before["moments_max_abs"] > 1e-6 and before["step_max_abs"] >= 1, before
    assert before["mismatched"], before
    assert after == EXACT
    assert results[layout]["extra"] == {"step": 2, "samples": 32}


def test_same_layout_continues_exactly(run):
    """A step after loading equals the original's next step: parameters, AdamW moments and step, lr schedule."""
    result = run[0]["dp2_tp2_zero1"]
    original, restored = result["continued_losses"]
    assert restored == original
    assert result["continued"] == EXACT


def test_loads_in_one_process(run):
    """dcp.load without a process group: the whole state equals the one saved by 4 processes."""
    results, ckpt = run
    saved = torch.load(f"{ckpt}.state.pt", weights_only=False)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["--log.wandb=disabled"])
    engine = build_engine(cfg, setup_parallel(cfg))
    assert load_sharded(ckpt, engine) == {"step": 2, "samples": 32}
    state = engine_state_dict(engine)
    loaded = {f"{part}.{k}": v for part in ("model", "optim") for k, v in state[part].items()}
    assert len(loaded) == results["keys"]
    assert deviation(loaded, saved) == EXACT


def test_manifest_records_the_save(run):
    _, ckpt = run
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    assert manifest["step"] == 2 and manifest["world_size"] == 4
    assert manifest["layout"] | {"dp_shard": 2, "tp": 2, "zero_stage": 1} == manifest["layout"]
    assert ".metadata" in manifest["files"] and sum(f.endswith(".distcp") for f in manifest["files"]) == 4
    assert not list(ckpt.parent.glob(".tmp_*"))
    verify_manifest(ckpt)


def test_verify_manifest_names_corrupted_and_missing_files(run, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(run[1], copy)
    shard = sorted(copy.glob("*.distcp"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shard.name} does not match"):
        verify_manifest(copy)
    shard.unlink()
    with pytest.raises(ValueError, match=f"{shard.name} is missing"):
        verify_manifest(copy)
