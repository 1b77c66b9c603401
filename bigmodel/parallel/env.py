"""The one place that reads a launcher's environment: torchrun (and the deepspeed launcher, which sets the same
names), Open MPI, MPICH / Intel MPI, and Slurm's srun.

Each launcher's variables are read as a set, never mixed: inside a Slurm allocation torchrun's RANK is what counts,
and the batch shell's SLURM_* variables (which describe the allocation, not this process) are ignored.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Launcher = Literal["torchrun", "openmpi", "mpich", "slurm", "none"]

DEFAULT_MASTER_PORT = 29500
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
TIMEOUT_VARIABLE = "BIGMODEL_COLLECTIVE_TIMEOUT"


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, and where the job's processes meet (master_addr:master_port; the
    address is empty when a multi-node launcher did not say)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    launcher: Launcher = "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# (rank, world size, local rank, local world size) per launcher, in order of precedence. torchrun comes first: under
# srun or mpirun it is the innermost launcher. MPI comes before Slurm because mpirun inside an allocation inherits
# the allocation's SLURM_* variables. The deepspeed launcher sets LOCAL_SIZE where torchrun sets LOCAL_WORLD_SIZE.
_VARIABLES: dict[Launcher, tuple[str, str, str, tuple[str, ...]]] = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK", ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")),
    "openmpi": (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        ("OMPI_COMM_WORLD_LOCAL_SIZE",),
    ),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", ("MPI_LOCALNRANKS",)),
    # Only srun's tasks have SLURM_STEP_NUM_TASKS; a batch shell has SLURM_PROCID=0 but is not a task of a step.
    "slurm": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", ()),
}


def _int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; fix the launcher") from None


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list as names: "gpu[01-03,07],login1" -> gpu01, gpu02, gpu03, gpu07, login1."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", hostlist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            width = len(first)
            for number in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{number:0{width}d}")
    return hosts


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """The task count of node `node_id` from Slurm's per-node list: "2(x3),1" means 2, 2, 2, 1."""
    counts = []
    for item in tasks_per_node.split(","):
        count, _, repeat = item.partition("(x")
        counts += [int(count)] * int(repeat.rstrip(")") or 1)
    return counts[min(node_id, len(counts) - 1)]


def _launcher() -> Launcher:
    for name, (rank, world, _, _) in _VARIABLES.items():
        if os.environ.get(rank) and os.environ.get(world):
            return name
    return "none"


def _local_world_size(launcher: Launcher, world: int) -> int:
    if launcher == "slurm":
        per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "")
        return tasks_on_node(per_node, _int("SLURM_NODEID")) if per_node else world
    for name in _VARIABLES[launcher][3]:
        if os.environ.get(name):
            return _int(name)
    return world


def _master_addr(launcher: Launcher, local_world: int, world: int) -> str:
    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if launcher == "slurm" and nodelist:
        return expand_hostlist(nodelist)[0]
    return "127.0.0.1" if local_world == world else ""  # several nodes, and nothing says where rank 0 runs


def _master_port() -> int:
    if os.environ.get("MASTER_PORT"):
        return _int("MASTER_PORT")
    job = os.environ.get("SLURM_JOB_ID")
    # Jobs that share a first node must not meet on the same port: derive it from the job id.
    return 20000 + int(job) % 10000 if job and job.isdigit() else DEFAULT_MASTER_PORT


def read_dist_env() -> DistEnv:
    """Rank, world size, local rank, local world size and meeting point from whichever launcher started this
    process (a single process when none did). Raises ValueError (one line) on a malformed variable."""
    launcher = _launcher()
    if launcher == "none":
        return DistEnv()
    rank_name, world_name, local_name, _ = _VARIABLES[launcher]
    world = _int(world_name)
    local_world = _local_world_size(launcher, world)
    return DistEnv(
        rank=_int(rank_name),
        world_size=world,
        local_rank=_int(local_name) if os.environ.get(local_name) else 0,
        local_world_size=local_world,
        master_addr=_master_addr(launcher, local_world, world),
        master_port=_master_port(),
        launcher=launcher,
    )


def collective_timeout_s() -> float:
    """Seconds any collective may wait for its peers: BIGMODEL_COLLECTIVE_TIMEOUT, default 600."""
    value = os.environ.get(TIMEOUT_VARIABLE, "")
    if not value:
        return DEFAULT_COLLECTIVE_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_VARIABLE}={value!r} must be a positive number of seconds, e.g. 600")
    return seconds


def init_distributed(env: DistEnv, backend: str | None = None, timeout_s: float | None = None) -> None:
    """Join the job's process group (gloo on CPU, nccl on GPUs) when more than one process runs.

    Processes started by MPI or srun get torchrun's variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE) from `env` where they are unset, so every library in the process reads one story.
    The timeout (default: collective_timeout_s()) bounds every collective, so a dead or stuck peer ends the job
    with an error instead of a hang.
    """
    import datetime

    import torch
    import torch.distributed as dist

    if not env.distributed or dist.is_initialized():
        return
    if not env.master_addr:
        raise ValueError(
            f"MASTER_ADDR is not set and {env.launcher} does not say where rank 0 runs; "
            "export MASTER_ADDR=<first node's address> (and MASTER_PORT) before starting the job"
        )
    check_resolves(env)
    for name, value in (
        ("MASTER_ADDR", env.master_addr),
        ("MASTER_PORT", env.master_port),
        ("RANK", env.rank),
        ("WORLD_SIZE", env.world_size),
        ("LOCAL_RANK", env.local_rank),
        ("LOCAL_WORLD_SIZE", env.local_world_size),
    ):
        os.environ.setdefault(name, str(value))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else collective_timeout_s())
    dist.init_process_group(backend, timeout=timeout)


def check_resolves(env: DistEnv) -> None:
    """Raise ValueError (one line) if rank 0's address does not resolve here: every rank would otherwise retry its
    connection until the collective timeout (10 minutes by default) and end with a traceback."""
    import socket

    try:
        socket.getaddrinfo(env.master_addr, env.master_port)
    except (socket.gaierror, UnicodeError) as err:
        if os.environ.get("MASTER_ADDR"):
            source = "from MASTER_ADDR"
        else:
            source = f"the first node of the {env.launcher} step (SLURM_STEP_NODELIST)"
        raise ValueError(
            f"rank 0's address {env.master_addr!r}, {source}, does not resolve on this node ({err.strerror or err}); "
            "export MASTER_ADDR=<rank 0's node address> (for a Slurm node: the NodeAddr of `scontrol show node NAME`)"
        ) from None


def exit_distributed(code: int = 0) -> None:
    """Leave the job and end this process with `code`, skipping the interpreter's teardown.

    gloo worker threads can still be freeing tensors while Python shuts down, which aborts the process ("terminate
    called without an active exception") after all work is done, in up to ~40% of runs on these machines. A barrier,
    destroying the group and os._exit avoid it (0 crashes in 30 runs, see shared/notes/torch-distributed-cpu.md).
    """
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def default_device(local_rank: int = 0) -> torch.device:
    """This process's GPU when there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")
