"""All-gather, reduce-scatter and all-reduce through shared memory, for the ranks of a gloo group on one host.

gloo moves every byte between two local processes through the kernel's TCP loopback; a copy into and out of shared
memory runs at memory speed (docs/benchmarks.md, row f).

Each rank of the group owns one segment of `2 x SLOT_BYTES` in /dev/shm, mapped by every rank of the group: two
slots, used in turn by successive collectives. A collective writes this rank's data into its slot, waits for the
group (one 4-byte gloo all-reduce), then reads what it needs from the other ranks' slots (an all-reduce: sums its
own share of the buffer, writes the sum back into its slot, waits again and reads the others' sums). Two slots make
that enough: a rank writes a slot again two collectives later, after every rank has passed the first wait of the
collective in between, so after every rank has finished reading it. A payload larger than a slot goes in
pieces, one wait each. The segment files are unlinked once every rank has mapped them, so nothing is left behind
in /dev/shm, even if a process is killed. The segment's memory is reserved when it is made, so a full /dev/shm
(Docker's is 64 MB unless `--shm-size` says otherwise) means the fallback below, never a crash at a later write.

`HostSegments.create` is collective over the group and returns None (every rank alike) where some rank cannot see
another's segment: ranks on different hosts, containers with separate /dev/shm, no /dev/shm at all. Then, or with
`BIGMODEL_SHM=0`, `bigmodel.parallel.gloo.collectives` uses point-to-point messages instead.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import uuid
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

SLOT_BYTES = 16 << 20
SHM_DIR = Path("/dev/shm")


def enabled() -> bool:
    """False where the environment turns shared memory off (`BIGMODEL_SHM=0`)."""
    return os.environ.get("BIGMODEL_SHM", "1") != "0"


class HostSegments:
    """Every rank's shared slots for one gloo `group`, mapped into this process. Collectives on it run in the
    same order on every rank of the group, from one thread."""

    def __init__(self, group: dist.ProcessGroup, maps: list[mmap.mmap], slot_bytes: int) -> None:
        self._group = weakref.ref(group)  # collectives keys its cache by the group, weakly
        self.rank, self.world = group.rank(), group.size()
        self.slot_bytes = slot_bytes
        self._maps = maps  # kept alive: the tensors below view their memory
        whole = [torch.frombuffer(m, dtype=torch.uint8) for m in maps]
        self._slots = [[segment[i * slot_bytes : (i + 1) * slot_bytes] for segment in whole] for i in range(2)]
        self._turn = 0
        self._flag = torch.zeros(1)

    @classmethod
    def create(cls, group: dist.ProcessGroup, slot_bytes: int | None = None) -> HostSegments | None:
        """Map every rank's segment (two slots of `slot_bytes`, SLOT_BYTES as it is now by default), or None on every
        rank if some rank cannot. Collective over `group`."""
        slot_bytes = SLOT_BYTES if slot_bytes is None else slot_bytes
        rank, world = group.rank(), group.size()
        mark = uuid.uuid4().bytes
        own = SHM_DIR / f"bigmodel-{uuid.uuid4().hex}-{rank}"
        maps: list[mmap.mmap | None] = [None] * world
        try:
            maps[rank] = _map(own, 2 * slot_bytes, create=True)
            maps[rank][: len(mark)] = mark
        except OSError:  # no folder, or no room to reserve the segment (ENOSPC from a full /dev/shm)
            with contextlib.suppress(OSError):  # raising here would leave the other ranks waiting below
                own.unlink()  # the empty file made before the reservation failed
            own = None
        names: list[tuple[str | None, bytes]] = [(None, b"")] * world
        dist.all_gather_object(names, (str(own) if own else None, mark), group=group)
        ok = False
        try:
            for peer, (name, peer_mark) in enumerate(names):
                if peer != rank and name is not None:
                    maps[peer] = _map(Path(name), 2 * slot_bytes, create=False)
                    if maps[peer][: len(peer_mark)] != peer_mark:  # a file of that name, but not the peer's
                        raise OSError(f"{name} is not rank {peer}'s segment")
            ok = all(m is not None for m in maps)
        except OSError:
            pass
        finally:
            everyone = torch.tensor([1.0 if ok else 0.0])
            dist.all_reduce(everyone, op=dist.ReduceOp.MIN, group=group)  # every rank has mapped what it could
            if own is not None:
                own.unlink(missing_ok=True)
        if everyone.item() < 1:
            for m in maps:
                if m is not None:
                    m.close()
            return None
        return cls(group, maps, slot_bytes)

    def _next_slot(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """The next slot of every rank, as flat tensors of `dtype`."""
        slots = self._slots[self._turn]
        self._turn ^= 1
        return [slot.view(dtype) for slot in slots]

    def _wait(self) -> None:
        dist.all_reduce(self._flag, group=self._group())

    def all_gather_into(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """`dist.all_gather_into_tensor(output, input)`: chunk r of the contiguous `output` gets rank r's `input`."""
        mine, chunks = input.reshape(-1), output.view(self.world, -1)
        per = self.slot_bytes // input.element_size()
        for start in range(0, mine.numel(), per):
            stop = min(start + per, mine.numel())
            slots = self._next_slot(input.dtype)
            slots[self.rank][: stop - start].copy_(mine[start:stop])
            self._wait()
            for peer in range(self.world):
                if peer != self.rank:
                    chunks[peer, start:stop].copy_(slots[peer][: stop - start])
        if chunks[self.rank].data_ptr() != mine.data_ptr():
            chunks[self.rank].copy_(mine)

    def reduce_scatter_sum(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """`dist.reduce_scatter_tensor(output, input, SUM)`: `output` gets the sum, in rank order, of chunk `rank` of
        every rank's contiguous `input`."""
        chunks, flat = input.view(self.world, -1), output.view(-1)
        per = self.slot_bytes // (self.world * input.element_size())
        for start in range(0, chunks.shape[1], per):
            stop = min(start + per, chunks.shape[1])
            slots = [slot[: self.world * (stop - start)].view(self.world, -1) for slot in self._next_slot(input.dtype)]
            for peer in range(self.world):  # row p of every rank's slot goes to rank p; the own row stays in `input`
                if peer != self.rank:
                    slots[self.rank][peer].copy_(chunks[peer, start:stop])
            self._wait()
            terms = [slots[p][self.rank] for p in range(self.world)]
            terms[self.rank] = chunks[self.rank, start:stop]
            sum_in_rank_order(flat[start:stop], terms)

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """`dist.all_reduce(tensor, SUM)` of the contiguous `tensor`, in place: rank r sums share r of the buffer,
        in rank order, for every rank, so every rank ends with the same bits."""
        flat = tensor.view(-1)
        per = self.slot_bytes // tensor.element_size()
        for start in range(0, flat.numel(), per):
            piece = flat[start : start + per]
            slots = [slot[: piece.numel()] for slot in self._next_slot(tensor.dtype)]
            slots[self.rank].copy_(piece)
            self._wait()
            bounds = [piece.numel() * p // self.world for p in range(self.world + 1)]
            share = slice(bounds[self.rank], bounds[self.rank + 1])
            # Summed into `piece` (its own values are in the slot); only this rank reads this share of its slot.
            sum_in_rank_order(piece[share], [slot[share] for slot in slots])
            slots[self.rank][share].copy_(piece[share])
            self._wait()
            for peer in range(self.world):
                if peer != self.rank:
                    theirs = slice(bounds[peer], bounds[peer + 1])
                    piece[theirs].copy_(slots[peer][theirs])


def sum_in_rank_order(out: torch.Tensor, terms: list[torch.Tensor]) -> None:
    """`out` = terms[0] + terms[1] + ..., added in that order (rank order: the same bits wherever it runs). At least
    two terms; `out` may be one of them only if it is the first or second."""
    torch.add(terms[0], terms[1], out=out)
    for term in terms[2:]:
        out.add_(term)


def _map(path: Path, size: int, create: bool) -> mmap.mmap:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.posix_fallocate(fd, 0, size)  # ENOSPC now, not SIGBUS at a write into a full tmpfs (Docker: 64 MB)
        elif os.fstat(fd).st_size != size:
            raise OSError(f"{path} has {os.fstat(fd).st_size} bytes, not {size}")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)
