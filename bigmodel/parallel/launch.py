"""Building the torchrun command that starts `python -m bigmodel.train` on this node."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class TorchrunSpec:
    """What torchrun needs to know: processes on this node and, for several nodes, how they meet."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""
    max_restarts: int = 0


def threads_per_process(nproc_per_node: int) -> int:
    """CPU threads each process should use so the node's usable cores are shared, not oversubscribed."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // nproc_per_node)


def torchrun_command(spec: TorchrunSpec, args: list[str], module: str = "bigmodel.train") -> list[str]:
    """argv that runs `python -m module args` under torchrun (itself started as `python -m torch.distributed.run`,
    so this interpreter's torch is used)."""
    if spec.nproc_per_node < 1:
        raise ValueError(f"--nproc must be at least 1, got {spec.nproc_per_node}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={spec.nproc_per_node}"]
    if spec.nnodes == 1:
        cmd.append("--standalone")
    else:
        if not spec.rdzv_endpoint:
            raise ValueError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node's address)")
        cmd += [
            f"--nnodes={spec.nnodes}",
            f"--node-rank={spec.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={spec.rdzv_endpoint}",
        ]
    if spec.max_restarts:
        cmd.append(f"--max-restarts={spec.max_restarts}")
    return [*cmd, "-m", module, *args]


def printable(cmd: list[str], env: dict[str, str]) -> str:
    """The command as a shell line a user can copy, with its environment assignments first."""
    shown = ["torchrun", *cmd[3:]] if cmd[1:3] == ["-m", "torch.distributed.run"] else cmd
    return " ".join([*(f"{k}={v}" for k, v in env.items()), *map(shlex.quote, shown)])
