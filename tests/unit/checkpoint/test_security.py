"""Loading a checkpoint never runs code pickled into it.

A planted object's `__reduce__` creates a marker file when unpickled by Python's pickle. It is planted in every place a
bigmodel checkpoint or a transformers directory could carry a pickle: DCP's `.metadata` index, a non-tensor item of a
shard (a torch.save blob, a `.pt` in all but name, or a bare pickle, as bigmodel stores plain data), a tensor item of
a shard (raw bytes in bigmodel's format, a torch.save blob in DCP's), and pytorch_model.bin. The manifest's checksums
are recomputed after planting, as whoever crafts a checkpoint would. Each case first shows that the plant is live
(the unsafe reader DCP or torch would use creates the marker), then that bigmodel refuses with one
line and the marker never appears.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pathlib
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from bigmodel.checkpoint.manifest import MANIFEST_FILE, verify_manifest
from bigmodel.checkpoint.safe import UnsafeCheckpointError, read_dcp_metadata
from bigmodel.checkpoint.sharded import load_sharded
from bigmodel.checkpoint.tools import consolidate
from bigmodel.cli import main as cli_main
from bigmodel.config import load_config
from bigmodel.config.load import config_from_dict
from bigmodel.engines.native import NativeEngine
from bigmodel.parallel.context import setup_parallel
from bigmodel.train.loop import train

QUICK = ["--train.steps=1", "--train.warmup_steps=0", "--log.progress=false", "--log.wandb=disabled"]


class Plant:
    """Unpickled by pickle, it touches `marker`: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = load_config("configs/tiny-clip.yaml", [*QUICK, "--data.eval_size=8", f"--train.out_dir={out}"])
    return train(cfg).checkpoint


@pytest.fixture
def copy(checkpoint: Path, tmp_path: Path) -> Path:
    return shutil.copytree(checkpoint, tmp_path / "step_00000001")


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran"


def rehash(folder: Path) -> None:
    """Record the planted files' sha256 in the manifest, so integrity checks pass as for a crafted checkpoint."""
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"] = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in manifest["files"]}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    verify_manifest(folder)


def engine_of(folder: Path) -> NativeEngine:
    cfg = config_from_dict(json.loads((folder / MANIFEST_FILE).read_text())["extra"]["config"])
    return NativeEngine(cfg, setup_parallel(cfg))


def plant_item(folder: Path, fqn: str, payload: bytes) -> None:
    """Point the stored item `fqn` at `payload`, appended to its shard file; the index stays legitimate."""
    metadata = read_dcp_metadata(folder / ".metadata")
    (index, info) = next((i, s) for i, s in metadata.storage_data.items() if i.fqn == fqn)
    shard = folder / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload)
    info.offset, info.length = offset, len(payload)
    metadata.storage_data[index] = info
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    rehash(folder)


def saved_plant(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Plant(marker), buffer)  # how DCP stores a non-tensor item: one torch.save blob
    return buffer.getvalue()


def assert_one_line(err: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(err.value), str(err.value)


def test_planted_metadata_is_refused(copy: Path, marker: Path, capsys) -> None:
    (copy / ".metadata").write_bytes(pickle.dumps(Plant(marker)))
    rehash(copy)
    with contextlib.suppress(Exception):  # the plant is live: DCP's own reader runs it
        FileSystemReader(copy).read_metadata()
    assert marker.exists()
    marker.unlink()

    for load in (lambda: load_sharded(copy, engine_of(copy)), lambda: consolidate(copy, copy.parent / "w.st")):
        with pytest.raises(UnsafeCheckpointError, match=r"\.metadata holds a pickled pathlib\.Path\.touch") as err:
            load()
        assert_one_line(err)
    assert cli_main.main(["ckpt", "inspect", str(copy)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not marker.exists()


def test_planted_non_tensor_item_is_refused(copy: Path, marker: Path) -> None:
    plant_item(copy, "scheduler.last_epoch", saved_plant(marker))
    with contextlib.suppress(Exception):  # live: DCP's default planner torch.loads it with weights_only=False
        dcp.load({"scheduler": {"last_epoch": 0}}, checkpoint_id=copy)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeCheckpointError, match=r"scheduler\.last_epoch holds a pickled") as err:
        load_sharded(copy, engine_of(copy))
    assert_one_line(err)
    assert not marker.exists()


def test_planted_plain_record_is_refused(copy: Path, marker: Path) -> None:
    """bigmodel stores plain non-tensor items as bare pickles (plain_record): one that names a class is refused."""
    payload = pickle.dumps(Plant(marker), protocol=pickle.HIGHEST_PROTOCOL)
    pickle.loads(payload)  # live
    assert marker.exists()
    marker.unlink()

    plant_item(copy, "scheduler.last_epoch", payload)
    with pytest.raises(UnsafeCheckpointError, match=r"scheduler\.last_epoch holds a pickled pathlib\.Path") as err:
        load_sharded(copy, engine_of(copy))
    assert_one_line(err)
    assert not marker.exists()

    plant_item(copy, "scheduler.last_epoch", payload[: len(payload) // 2])  # cut short
    with pytest.raises(ValueError, match=r"scheduler\.last_epoch is not a readable record") as err:
        load_sharded(copy, engine_of(copy))
    assert_one_line(err)


def test_non_tensor_items_are_plain_records_and_torch_save_records_still_load(copy: Path) -> None:
    """Hyper-parameters and the schedule are stored as plain_records; torch.save records of the values (what DCP and
    earlier format-3 checkpoints store: hyper-parameters as a tuple of pairs) load the same."""
    metadata = read_dcp_metadata(copy / ".metadata")
    bytes_items = [(i, s) for i, s in metadata.storage_data.items() if not i.fqn.startswith(("model.", "optim.state"))]
    assert bytes_items and all(i.fqn.startswith(("optim.param_groups.", "scheduler.")) for i, _ in bytes_items)
    for index, info in bytes_items:
        with open(copy / info.relative_path, "rb") as f:
            f.seek(info.offset)
            assert f.read(1) == pickle.PROTO, index.fqn

    engine = engine_of(copy)
    load_sharded(copy, engine)
    expected = engine.scheduler.state_dict(), [dict(g, params=None) for g in engine.optimizer.param_groups]
    for index, info in bytes_items:
        with open(copy / info.relative_path, "rb") as f:
            f.seek(info.offset)
            value = pickle.loads(f.read(info.length))
        if isinstance(value, bytes):  # hyper-parameters: a plain record of the tuple earlier checkpoints stored
            value = pickle.loads(value)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        plant_item(copy, index.fqn, buffer.getvalue())
    engine = engine_of(copy)
    load_sharded(copy, engine)
    assert (engine.scheduler.state_dict(), [dict(g, params=None) for g in engine.optimizer.param_groups]) == expected


def test_planted_tensor_item_is_never_unpickled(copy: Path, marker: Path) -> None:
    """A tensor record is raw bytes: a pickle planted there is refused by its length, or read as numbers."""
    key = "model.text.token_embedding.weight"
    plant_item(copy, key, saved_plant(marker))
    with pytest.raises(ValueError, match=rf"stores {key} in \d+ bytes, not the \d+ of a raw torch.float32") as err:
        load_sharded(copy, engine_of(copy))
    assert_one_line(err)
    with pytest.raises(ValueError, match=r"not the \d+ of a raw"):
        consolidate(copy, copy.parent / "w.safetensors")

    engine = engine_of(copy)
    weight = engine.model.text.token_embedding.weight
    payload = saved_plant(marker)
    plant_item(copy, key, payload.ljust(weight.numel() * 4, b"\0")[: weight.numel() * 4])  # the record's own length
    load_sharded(copy, engine)
    assert weight.detach().view(-1).view(torch.uint8)[:16].numpy().tobytes() == payload[:16]  # data, not a program
    assert not marker.exists()


def test_planted_pytorch_model_bin_is_refused(checkpoint: Path, tmp_path: Path, marker: Path) -> None:
    pytest.importorskip("transformers")
    from bigmodel.hf.convert import export_hf, import_hf

    hf_dir = export_hf(checkpoint, tmp_path / "hf")
    torch.save(Plant(marker), hf_dir / "pytorch_model.bin")
    torch.load(hf_dir / "pytorch_model.bin", weights_only=False)  # live
    assert marker.exists()
    marker.unlink()

    import_hf(hf_dir, tmp_path / "with-both")  # safetensors beside it: only the safetensors file is read
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors; bigmodel loads only safetensors") as err:
        import_hf(hf_dir, tmp_path / "bin-only")
    assert_one_line(err)
    assert not marker.exists()
