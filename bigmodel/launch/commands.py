"""Building the launcher commands that start `python -m bigmodel.train` on a node: torchrun (single node, or several
meeting at a c10d rendezvous) and the deepspeed launcher (a hostfile, or one command per node without ssh).

Both launchers give every process the same variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...), which
bigmodel.parallel.env.read_dist_env reads, whatever the config's engine.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MODULE = "bigmodel.train"


@dataclass(frozen=True)
class TorchrunSpec:
    """What torchrun needs to know: processes on this node and, for several nodes, how they meet.

    `agent_signals` replaces the signals torchrun's agent catches and forwards (torch >= 2.8's
    --signals-to-handle); the Slurm batch script uses it so each worker gets a scheduler's signal once.
    """

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int | str = 0
    """This node's index, or a shell variable naming it in a batch script ("$SLURM_NODEID")."""
    rdzv_endpoint: str = ""
    max_restarts: int = 0
    rdzv_id: str = ""
    log_dir: str = ""
    agent_signals: str = ""


def restart_environment(max_restarts: int) -> dict[str, str]:
    """Variables torchrun needs for restarts to work: torch >= 2.5 lets the workers share the agent's store, whose
    keys outlive a restart, and restarted workers then read their predecessors' addresses and fail or hang in
    init_process_group (pytorch issue 135712; seen here with torch 2.13). Each worker group then gets its own."""
    return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if max_restarts else {}


def threads_per_process(nproc_per_node: int) -> int:
    """CPU threads each process should use so the node's usable cores are shared, not oversubscribed."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // nproc_per_node)


def torchrun_command(
    spec: TorchrunSpec, args: list[str], module: str = MODULE, python: str = sys.executable
) -> list[str]:
    """argv that runs `python -m module args` under torchrun (itself started as `python -m torch.distributed.run`,
    so this interpreter's torch is used)."""
    if spec.nproc_per_node < 1:
        raise ValueError(f"--nproc must be at least 1, got {spec.nproc_per_node}")
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={spec.nproc_per_node}"]
    if spec.nnodes == 1:
        cmd.append("--standalone")
    else:
        if not spec.rdzv_endpoint:
            raise ValueError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node's address)")
        if isinstance(spec.node_rank, int) and not 0 <= spec.node_rank < spec.nnodes:
            raise ValueError(f"--node-rank must be in 0..{spec.nnodes - 1}, got {spec.node_rank}")
        cmd += [
            f"--nnodes={spec.nnodes}",
            f"--node-rank={spec.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={spec.rdzv_endpoint}",
        ]
        if spec.rdzv_id:
            cmd.append(f"--rdzv-id={spec.rdzv_id}")
    if spec.max_restarts:
        cmd.append(f"--max-restarts={spec.max_restarts}")
    if spec.log_dir:
        cmd.append(f"--log-dir={spec.log_dir}")
    if spec.agent_signals:
        cmd.append(f"--signals-to-handle={spec.agent_signals}")
    return [*cmd, "-m", module, *args]


@dataclass(frozen=True)
class DeepSpeedSpec:
    """What the deepspeed launcher needs: processes per node and, for several nodes, a hostfile (it starts the
    other nodes over ssh/pdsh) or a node rank (each node runs the command itself, --no_ssh)."""

    nproc_per_node: int
    hostfile: str = ""
    nnodes: int = 1
    node_rank: int | None = None
    master_addr: str = ""
    master_port: int = 29500


def read_hostfile(path: str) -> dict[str, int]:
    """Hosts and slots from a deepspeed/MPI hostfile ("host slots=N" per line, # comments)."""
    hosts = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        slots = [w for w in words[1:] if w.startswith("slots=")]
        if len(words) != 2 or not slots or not slots[0].removeprefix("slots=").isdigit():
            raise ValueError(f"{path} line {number}: {line.strip()!r}; hostfile lines look like 'node1 slots=8'")
        hosts[words[0]] = int(slots[0].removeprefix("slots="))
    if not hosts:
        raise ValueError(f"{path} lists no hosts; write one 'HOST slots=N' line per node")
    return hosts


def check_ssh(hosts: list[str], hostfile: str, timeout_s: int = 10) -> None:
    """Raise ValueError (one line) naming the first of `hosts` that `ssh` cannot reach without a password. The
    deepspeed launcher checks only the first host; an unreachable other one would leave the reachable hosts' workers
    waiting at the rendezvous until its timeout. The hosts are tried at once, each for at most `timeout_s`."""
    base = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout_s}"]
    tries = [
        (host, subprocess.Popen([*base, host, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True))
        for host in hosts
    ]  # fmt: skip
    failed = []
    for host, ssh in tries:
        _, err = ssh.communicate()
        if ssh.returncode != 0:
            failed.append((host, (err.strip().splitlines() or [f"exit status {ssh.returncode}"])[-1]))
    if failed:
        host, reason = failed[0]
        others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise ValueError(
            f"cannot reach {host}{others} of {hostfile} over ssh without a password ({reason}); the deepspeed "
            f"launcher starts every host that way: make `ssh {host} true` work from here, or run the command on "
            "every node with --node-rank R --rdzv-endpoint HOST:PORT"
        )


def _is_this_machine(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", socket.gethostname(), socket.gethostname().split(".")[0])


def deepspeed_command(spec: DeepSpeedSpec, args: list[str], module: str = MODULE) -> list[str]:
    """argv that runs `python -m module args` under the deepspeed launcher (as `python -m deepspeed.launcher.runner`,
    this interpreter's deepspeed). Workers get no --local_rank argument (they read LOCAL_RANK, like torchrun's)."""
    if spec.nproc_per_node < 1:
        raise ValueError(f"--nproc must be at least 1, got {spec.nproc_per_node}")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={spec.nproc_per_node}"]
    master_addr = spec.master_addr
    if spec.hostfile:
        hosts = read_hostfile(spec.hostfile)
        if spec.nnodes > len(hosts):
            raise ValueError(f"--nnodes {spec.nnodes} but {spec.hostfile} lists {len(hosts)} hosts")
        cmd += [f"--hostfile={spec.hostfile}", f"--num_nodes={spec.nnodes}"]
        if spec.nnodes == 1 and _is_this_machine(next(iter(hosts))):
            # One local host: nothing to reach over ssh (the launcher would otherwise check it can).
            cmd.append("--no_ssh_check")
            master_addr = master_addr or "127.0.0.1"
    elif spec.nnodes > 1:
        raise ValueError("--launcher deepspeed with --nnodes > 1 needs --hostfile FILE ('HOST slots=N' per node)")
    if spec.node_rank is not None and spec.nnodes > 1:
        if not master_addr:
            raise ValueError("--node-rank needs --rdzv-endpoint HOST:PORT (the first node's address)")
        cmd += ["--no_ssh", f"--node_rank={spec.node_rank}"]
    if master_addr:
        cmd.append(f"--master_addr={master_addr}")
    cmd += [f"--master_port={spec.master_port}", "--no_local_rank", "--module", module, *args]
    return cmd


def printable(cmd: list[str], env: dict[str, str]) -> str:
    """The command as a shell line a user can copy, with its environment assignments first."""
    shown = cmd
    if cmd[1:3] == ["-m", "torch.distributed.run"]:
        shown = ["torchrun", *cmd[3:]]
    elif cmd[1:3] == ["-m", "deepspeed.launcher.runner"]:
        shown = ["deepspeed", *cmd[3:]]
    return " ".join([*(f"{k}={v}" for k, v in env.items()), *map(shlex.quote, shown)])
