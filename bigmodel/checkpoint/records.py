"""The record codec that the checkpoint writers and readers share: how a tensor, a plain value and the optimizer's
hyper-parameters are stored as bytes.

A tensor record is its elements' raw bytes in C order and the saving machine's byte order (`tensor_bytes`; DCP's
index holds its dtype and shape). A non-tensor item is a `plain_record` (a pickle naming no class or function) where
it is plain data, else DCP's torch.save; `read_plain_record` reads either without running code. The hyper-parameters
are one item per parameter (`pack_hyperparameters`).
"""

from __future__ import annotations

import io
import pickle
import re
from typing import IO, Any

import torch

HYPER_PREFIX = "param_groups."
_PLAIN_TYPES = (bool, int, float, str, bytes, type(None))


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds a pickled object that is not plain checkpoint data; nothing of it was run."""


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of `tensor`'s elements in C order and this machine's byte order: a (writable) view of its memory
    where it is contiguous on the CPU, else of a contiguous CPU copy. What a raw record stores (RawRecordWriter)."""
    dense = tensor.detach().cpu().contiguous()
    # as_strided, not view(-1): a contiguous tensor may carry any stride on a dimension of size 1, which view keeps.
    flat = dense.as_strided((dense.numel(),), (1,))
    return memoryview(flat.view(torch.uint8).numpy())


def _is_plain(value: Any) -> bool:
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    return type(value) in _PLAIN_TYPES  # exact types: a subclass pickles as a reference to its class


def plain_record(value: Any) -> bytes | None:
    """`value` pickled without references to any class or function (numbers, strings, bytes, None and tuples, lists,
    sets and dicts of them: hyper-parameters, the schedule's state), or None where it holds anything else.

    Such a record loads with an unpickler that refuses every global (`read_plain_record`), far faster than
    torch.load(weights_only=True) of the same value (docs/benchmarks.md, row g). A record starts with pickle's PROTO
    opcode; a torch.save record (a zip) with "PK".
    """
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL) if _is_plain(value) else None


class _PlainUnpickler(pickle.Unpickler):
    """Builds numbers, strings, bytes, None, tuples, lists, sets and dicts only (a `plain_record`): every reference
    to a class or function is refused before it is imported, so nothing can be called."""

    def __init__(self, file: IO[bytes], fqn: str) -> None:
        super().__init__(file)
        self.fqn = fqn

    def find_class(self, module: str, name: str) -> Any:
        raise _not_plain(self.fqn, f"{module}.{name}")


def _not_plain(fqn: str, found: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"checkpoint item {fqn} holds a pickled {found}, which is not plain data; refusing to load it (the checkpoint "
        "is crafted or corrupt)"
    )


def read_plain_record(value: IO[bytes], fqn: str) -> Any:
    """A non-tensor item: a `plain_record`, read with _PlainUnpickler, or a torch.save record (DCP's default, and
    what bigmodel stores for anything but plain data), read with weights_only=True."""
    if value.read(1) == pickle.PROTO:
        value.seek(0)
        try:
            return _PlainUnpickler(value, fqn).load()
        except UnsafeCheckpointError:
            raise
        except Exception as err:  # truncated or garbage: any unpickling error
            raise ValueError(f"checkpoint item {fqn} is not a readable record ({type(err).__name__}: {err})") from None
    value.seek(0)
    try:
        return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as err:
        raise _not_plain(fqn, _refused_global(err)) from None


def _refused_global(err: Exception) -> str:
    """The global torch's weights_only unpickler refused, from its message (which otherwise advises
    weights_only=False: exactly what must not be done with an untrusted file)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    return found[1] if found else "object"


def pack_hyperparameters(flat: dict[str, Any]) -> dict[str, Any]:
    """The flattened optimizer state with each parameter's hyper-parameters (`param_groups.<name>.<key>`: lr, betas,
    eps, ... about 12 per parameter) joined into one item `param_groups.<name>`: the `plain_record` of a tuple of
    (key, value) pairs (the tuple itself where a value is not plain data).

    DCP stores every item as a separate record (and an entry in the index), and its planners walk every value of a
    tuple; the hyper-parameters were most of a checkpoint's items and much of its save and load time
    (docs/benchmarks.md, row g). Per parameter name, like the rest of the state, so the form does not depend on the
    layout.
    """
    packed: dict[str, Any] = {}
    hyper: dict[str, list[tuple[str, Any]]] = {}
    for key, value in flat.items():
        if key.startswith(HYPER_PREFIX):
            name, _, field = key.removeprefix(HYPER_PREFIX).rpartition(".")
            hyper.setdefault(name, []).append((field, value))
        else:
            packed[key] = value
    records: dict[Any, Any] = {}  # parameters of one group share their hyper-parameters: one record per group
    for name, pairs in hyper.items():
        value = tuple(pairs)
        try:
            hash(value)
        except TypeError:  # a value that is a list: packed on its own
            packed[HYPER_PREFIX + name] = packed_hyperparameters(value)
            continue
        if value not in records:
            records[value] = packed_hyperparameters(value)
        packed[HYPER_PREFIX + name] = records[value]
    return packed


def packed_hyperparameters(pairs: tuple[tuple[str, Any], ...]) -> Any:
    """One parameter's (key, value) hyper-parameter pairs as pack_hyperparameters stores them."""
    record = plain_record(pairs)
    return pairs if record is None else record


def unpack_hyperparameters(packed: dict[str, Any]) -> dict[str, Any]:
    """pack_hyperparameters undone: torch's flattened form, which the optimizers' state-dict loaders take. A record
    that names any class or function is refused (UnsafeCheckpointError) without being run."""
    flat: dict[str, Any] = {}
    records: dict[bytes, Any] = {}  # a group's parameters share one record: read it once
    for key, value in packed.items():
        if key.startswith(HYPER_PREFIX):
            if isinstance(value, bytes):
                if value not in records:
                    records[value] = read_plain_record(io.BytesIO(value), key)
                value = records[value]
            flat.update({f"{key}.{field}": v for field, v in value})
        else:
            flat[key] = value
    return flat
