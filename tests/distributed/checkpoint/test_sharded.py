"""Sharded checkpoints (bigmodel.checkpoint.sharded) load into other parallel layouts, optimizer state included.

One 4-process launch (ckpt_worker.py) saves the tiny model after 2 AdamW steps at dp2 x tp2 with ZeRO-1
and loads it at dp2 x tp2 ZeRO-1, dp4 ZeRO-3 (FSDP2), tp2 x dp2 ZeRO-0 and dp4 ZeRO-2; this process loads it at
one process.
Every comparison is of whole (gathered) tensors by parameter name and is exact: loading copies the saved values and
recomputes nothing, and the continued step runs the same arithmetic on the same values in the same layout.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex

from bigmodel.checkpoint.manifest import CHECKSUM, MANIFEST_FILE, verify_manifest
from bigmodel.checkpoint.safe import read_dcp_metadata
from bigmodel.checkpoint.sharded import load_sharded
from bigmodel.config import load_config
from bigmodel.engines import build_engine
from bigmodel.parallel.context import setup_parallel
from tests.distributed.checkpoint.ckpt_worker import LOADS, ROOT, deviation
from tests.distributed.launch import run_worker

EXACT = {"model_max_abs": 0.0, "moments_max_abs": 0.0, "step_max_abs": 0.0, "mismatched": []}
"""Loading copies values: every tensor equal to the saved one, every hyper-parameter and name the same."""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(the worker's measurements, the checkpoint folder), from one 4-process launch per test session."""
    folder = tmp_path_factory.mktemp("sharded")
    ckpt = folder / "step_2"
    return run_worker(4, Path(__file__).with_name("ckpt_worker.py"), folder / "results.json", "--ckpt", str(ckpt)), ckpt


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
    state = engine.state_dict()
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


def test_tensors_are_stored_as_raw_bytes(run):
    """Format 3: every tensor record is exactly its chunk's elements (no torch.save framing), and the shard files
    hold nothing but the records the index lists."""
    _, ckpt = run
    metadata = read_dcp_metadata(ckpt / ".metadata")
    records = metadata.storage_data
    for fqn, meta in metadata.state_dict_metadata.items():
        for chunk in getattr(meta, "chunks", []):
            assert (
                records[MetadataIndex(fqn, chunk.offsets)].length
                == chunk.sizes.numel() * meta.properties.dtype.itemsize
            )
    assert sum(info.length for info in records.values()) == sum(f.stat().st_size for f in ckpt.glob("*.distcp"))


def test_manifest_checksums_name_their_algorithm(run, tmp_path):
    """New manifests record xxh3_128; a bare digest is sha256 (formats 1 and 2) and still verifies, and still
    catches one changed byte; an unknown algorithm is refused in one line."""
    copy = shutil.copytree(run[1], tmp_path / "ckpt")
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    assert all(digest.startswith(f"{CHECKSUM}:") for digest in manifest["files"].values())
    assert CHECKSUM == "xxh3_128"
    manifest["files"] = {name: hashlib.sha256((copy / name).read_bytes()).hexdigest() for name in manifest["files"]}
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    verify_manifest(copy)
    shard = sorted(copy.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shard.name} does not match its sha256 checksum"):
        verify_manifest(copy)
    manifest["files"][shard.name] = "md5:00"
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"{shard.name} has a md5 checksum; bigmodel reads"):
        verify_manifest(copy)


@pytest.mark.parametrize("older", ["bigmodel-sharded-1", "bigmodel-sharded-2"])
def test_older_formats_are_refused_in_one_line(run, tmp_path, older):
    """Formats 1 and 2 stored tensors as torch.save records, which the raw-record reader cannot read."""
    copy = shutil.copytree(run[1], tmp_path / "ckpt")
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest | {"format": older}))
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["--log.wandb=disabled"])
    with pytest.raises(ValueError, match=f"has format {older}, which stores tensors as torch.save records") as err:
        load_sharded(copy, build_engine(cfg, setup_parallel(cfg)))
    assert "\n" not in str(err.value)


def test_other_byte_order_is_refused_in_one_line(run, tmp_path):
    """Raw records are in the saving machine's byte order, which the manifest records."""
    copy = shutil.copytree(run[1], tmp_path / "ckpt")
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    assert manifest["byteorder"] == sys.byteorder
    other = "big" if sys.byteorder == "little" else "little"
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest | {"byteorder": other}))
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["--log.wandb=disabled"])
    with pytest.raises(ValueError, match=f"stores raw {other}-endian tensors; this machine is") as err:
        load_sharded(copy, build_engine(cfg, setup_parallel(cfg)))
    assert "\n" not in str(err.value)
