"""A checkpoint folder's manifest.json and the integrity checks it allows: reading it (one-line errors for what it
lacks), the checksum of every file, and checking the files against it, shared out over the ranks of a resume.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX

MANIFEST_FILE = "manifest.json"
CHECKSUM = "xxh3_128"
"""The checksum new manifests record; verify_manifest also reads sha256 (the digests of formats 1 and 2)."""
DIGEST_SUFFIX = ".digest"
"""A file's checksum left beside it by the rank that wrote it (RawRecordWriter); `checksums` takes and removes it."""
# xxh3_128 hashes at memory speed (~10x sha256 on one core); the digest guards against corruption, not a crafted
# checkpoint (whoever crafts the files writes the manifest too: bigmodel.checkpoint.safe), so it need not be
# cryptographic. sha256 stays readable for checkpoints written before.
HASHES: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def read_manifest(path: str | Path, *required: str) -> dict[str, Any]:
    """The manifest.json of the checkpoint folder `path`; ValueError (one line, naming the file) if it is not a JSON
    object or lacks one of the top-level fields `required`."""
    file = Path(path) / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not JSON ({err}); the checkpoint is incomplete or not bigmodel's") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{file} holds a {type(manifest).__name__}, not a bigmodel manifest")
    return require_fields(manifest, required, str(file))


def require_fields(value: dict[str, Any], names: Collection[str], where: str) -> dict[str, Any]:
    """`value` (a part of a manifest, named `where`), if it has every field of `names`; else read_manifest's error."""
    missing = [name for name in names if name not in value]
    if missing:
        raise ValueError(
            f"{where} lacks {', '.join(repr(name) for name in missing)}; the checkpoint is incomplete or not "
            "bigmodel's: use an earlier checkpoint"
        )
    return value


def verify_manifest(
    path: str | Path, files: Collection[str] | None = None, unlisted: bool | None = None, present: Collection[str] = ()
) -> None:
    """Raise ValueError naming the first file of the checkpoint at `path` that is missing, changed or unlisted.

    `files`: check only these of the manifest's files (a rank's share: `verify_shares`); `unlisted`: also look for
    files the manifest does not list (default: when checking every file); `present`: files only to be found listed and
    present here, their checksums left to the load that reads them (`checked_while_loading`).
    Digests are "<algorithm>:<hex>" (CHECKSUM) or, as formats 1 and 2 wrote them, a bare sha256 hex digest."""
    path = Path(path)
    expected = read_manifest(path, "files")["files"]
    for name in present:
        recorded(path, expected, name)
    for name in expected if files is None else files:
        algorithm, digest = recorded(path, expected, name)
        if file_digest(path / name, algorithm) != digest:
            raise ValueError(mismatch_line(path, name, algorithm))
    if not (files is None if unlisted is None else unlisted):
        return
    extra = sorted(set(_files(path)) - set(expected) - {MANIFEST_FILE})
    if extra:
        raise ValueError(f"checkpoint {path}: {extra[0]} is not listed in {MANIFEST_FILE}")


def verify_checkpoint(path: Path) -> list[str]:
    """Check the checkpoint's files against its manifest, shared out over the ranks (`verify_shares`: each rank its
    own shard file, so a resume reads the checkpoint once in parallel instead of the main rank reading all of it),
    and raise the same one-line ValueError on every rank if any file is missing or changed (the first failing rank's),
    so no rank waits in a collective for a failed one. The main rank also looks for unlisted files. Every rank of the
    default process group calls it (or the one process).

    Returns the files of this rank's share whose checksums are left to the load, which hashes them as it reads them
    (`checked_while_loading`: its own shard file when resuming with as many ranks); here they are only found present.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problem, deferred = None, []
    try:
        manifest = read_manifest(path, "files")
        share = verify_shares(manifest["files"], world)[rank]
        deferred = [n for n in checked_while_loading(manifest, rank, world) if n in share]
        verify_manifest(path, [n for n in share if n not in deferred], unlisted=rank == 0, present=deferred)
    except ValueError as err:
        problem = str(err)
    if dist.is_initialized():
        problems: list[str | None] = [None] * world
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        raise ValueError(problem)
    return deferred


def recorded(path: Path, expected: dict[str, str], name: str) -> tuple[str, str]:
    """(algorithm, hex digest) the manifest's `expected` records for the file `name`, which must exist; else the
    one-line ValueError naming what is wrong."""
    digest = expected.get(name)
    if digest is None:
        raise ValueError(f"checkpoint {path}: {name} is not listed in {MANIFEST_FILE}")
    if not (path / name).is_file():
        raise ValueError(f"checkpoint {path}: {name} is missing; restore it or use an earlier checkpoint")
    algorithm, _, digest = digest.rpartition(":")
    algorithm = algorithm or "sha256"
    if algorithm not in HASHES:
        raise ValueError(f"checkpoint {path}: {name} has a {algorithm} checksum; bigmodel reads {list(HASHES)}")
    return algorithm, digest


def mismatch_line(path: Path, name: str, algorithm: str) -> str:
    """verify_manifest's line for the file `name` of the checkpoint at `path` that fails its checksum."""
    return (
        f"checkpoint {path}: {name} does not match its {algorithm} checksum in {MANIFEST_FILE} (corrupt or changed); "
        "use an earlier checkpoint"
    )


def shard_file(rank: int) -> str:
    """The name of the shard file rank `rank` writes (RawRecordWriter, under DCP's `__<rank>_` prefix)."""
    return f"__{rank}_0{DEFAULT_SUFFIX}"


def checked_while_loading(manifest: dict[str, Any], rank: int, world_size: int) -> list[str]:
    """The files of `manifest` whose checksums rank `rank` of `world_size` may leave to `load_sharded(checked=...)`:
    its own shard file when the checkpoint was saved by as many ranks (a resume), which the load reads whole."""
    own = shard_file(rank)
    return [own] if manifest.get("world_size") == world_size and own in manifest["files"] else []


def verify_shares(names: Collection[str], world_size: int) -> list[list[str]]:
    """The manifest's files `names` shared out over `world_size` ranks for checking: rank r's own shard file
    `__<r>_0.distcp` to rank r (the file it reads when resuming in the layout that saved it, which the check then
    leaves in its page cache), the others in turn."""
    shares: list[list[str]] = [[] for _ in range(world_size)]
    owner = {shard_file(rank): rank for rank in range(world_size)}
    rest = []
    for name in sorted(names):
        if name in owner:
            shares[owner[name]].append(name)
        else:
            rest.append(name)
    for position, name in enumerate(rest):
        shares[position % world_size].append(name)
    return shares


def checksums(folder: Path) -> dict[str, str]:
    """`CHECKSUM:<hex digest>` of every file under `folder`, by relative path: the digest its writer left beside it
    (removed here), or else computed from the file (the index, files other tools wrote)."""
    names = _files(folder)
    sums = {}
    for name in (n for n in names if not n.endswith(DIGEST_SUFFIX)):
        left = folder / f"{name}{DIGEST_SUFFIX}"
        if f"{name}{DIGEST_SUFFIX}" in names:
            sums[name] = left.read_text(encoding="utf-8")
            left.unlink()
        else:
            sums[name] = f"{CHECKSUM}:{file_digest(folder / name, CHECKSUM)}"
    return sums


def file_digest(file: Path, algorithm: str) -> str:
    """The hex digest of `file` by `algorithm` (a key of HASHES)."""
    digest = HASHES[algorithm]()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
