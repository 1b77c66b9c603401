"""SigLIP's loss memory per rank for its two exchanges, measured by real gloo processes under torchrun.

Each rank scores b local images against B = b x W texts. "gather" builds the (b, B) logits at once; "ring" scores
one (b, b) block per hop and recomputes it in backward, so its peak should be about 1/W of gather's. The peak is
the rise of the process's resident high-water mark (ru_maxrss) over one forward and backward of the loss alone,
measured in a fresh launch per exchange (the high-water mark never falls). glibc is told to serve every allocation
above 64 KiB by mmap and to return it on free, so resident memory follows the live tensors (its default raises
that threshold after the first large free and keeps freed blocks, which would count reuse as growth).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bigmodel.bench.common import Figure, run_workers
from bigmodel.losses import siglip_loss

MODULE = "bigmodel.bench.siglip"
WORLD = 4
EMBED_DIM = 256


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(exchange: str, local_batch: int) -> dict[str, Any]:
    """Peak bytes one forward + backward of the loss adds on this rank (every rank of the world calls it)."""
    gen = torch.Generator().manual_seed(dist.get_rank())
    images = torch.nn.functional.normalize(torch.randn(local_batch, EMBED_DIM, generator=gen), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(local_batch, EMBED_DIM, generator=gen), dim=-1)
    images.requires_grad_()
    texts.requires_grad_()
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    dist.barrier()
    before = peak_rss_bytes()
    siglip_loss(images, texts, scale, bias, dist.group.WORLD, exchange).backward()
    dist.barrier()
    return {"exchange": exchange, "peak_bytes": peak_rss_bytes() - before, "b": local_batch}


def worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--exchange", required=True, choices=["gather", "ring"])
    parser.add_argument("--local-batch", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    measure(args.exchange, 8)  # first calls page in code and modules, which resident memory would count
    mine = measure(args.exchange, args.local_batch)
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, mine)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(per_rank), encoding="utf-8")
    dist.destroy_process_group()
    return 0


def siglip_memory(quick: bool = False) -> list[Figure]:
    """(k) ring vs gather: the largest per-rank peak of the loss's forward and backward, W=4 gloo ranks."""
    local_batch = 512 if quick else 2048
    peaks = {}
    with tempfile.TemporaryDirectory(prefix="bigmodel-bench-") as tmp:
        for exchange in ("gather", "ring"):
            out = Path(tmp) / f"{exchange}.json"
            args = ["--exchange", exchange, "--local-batch", str(local_batch), "--out", str(out)]
            run_workers(WORLD, MODULE, args, env={"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)})
            peaks[exchange] = max(r["peak_bytes"] for r in json.loads(out.read_text()))
    block = 4 * local_batch * local_batch  # one fp32 (b, b) block
    command = "bigmodel bench --only siglip" + (" --quick" if quick else "")
    return [
        Figure(
            name="siglip_ring_memory",
            title=f"SigLIP loss peak per rank, ring / gather (W={WORLD}, b={local_batch}, B={WORLD * local_batch})",
            ratio=peaks["ring"] / peaks["gather"],
            target=2 / WORLD,
            direction="<=",
            baseline={"label": "gather (b x B logits)", "value": peaks["gather"] / 2**20, "unit": "MiB"},
            candidate={"label": "ring (b x b blocks)", "value": peaks["ring"] / 2**20, "unit": "MiB"},
            command=command,
            details={
                "block_MiB": block / 2**20,
                "gather_in_blocks": peaks["gather"] / block,
                "ring_in_blocks": peaks["ring"] / block,
            },
        )
    ]


if __name__ == "__main__":
    raise SystemExit(worker_main())
