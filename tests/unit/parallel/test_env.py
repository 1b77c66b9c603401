"""read_dist_env: each launcher's variables, exactly as torchrun, the deepspeed launcher, srun, Open MPI and MPICH set
them (the Slurm sets were recorded from a real srun step and batch shell on the local test cluster)."""

from __future__ import annotations

import os

import pytest

from bigmodel.parallel.env import (
    DistEnv,
    collective_timeout_s,
    expand_hostlist,
    read_dist_env,
    tasks_on_node,
)

# A batch shell of `sbatch -N 2 --ntasks-per-node=1`: it describes the allocation, it is not a task of a step.
SLURM_BATCH = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "node[1-2]",
    "SLURM_LOCALID": "0",
    "SLURM_NNODES": "2",
    "SLURM_NODEID": "0",
    "SLURM_NTASKS": "2",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_PROCID": "0",
    "SLURM_TASKS_PER_NODE": "1(x2)",
}
# Task 3 of `srun -N 2 --ntasks-per-node=2` in that allocation (second node, second task there).
SLURM_STEP = SLURM_BATCH | {
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "3",
    "SLURM_STEPID": "0",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}
TORCHRUN = {
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "MASTER_ADDR": "10.0.0.7",
    "MASTER_PORT": "29400",
}
# The deepspeed launcher: torchrun's names except LOCAL_SIZE for the local world size.
DEEPSPEED = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "LOCAL_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "CROSS_RANK": "0",
    "CROSS_SIZE": "1",
}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "6",
    "OMPI_COMM_WORLD_SIZE": "16",
    "OMPI_COMM_WORLD_LOCAL_RANK": "2",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
}
MPICH = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}

PREFIXES = ("SLURM_", "OMPI_", "PMI_", "MPI_", "CROSS_")
NAMES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "BIGMODEL_COLLECTIVE_TIMEOUT",
)


@pytest.fixture
def environ(monkeypatch):
    """A clean launcher environment; returns a function that sets variables."""
    for name in list(os.environ):
        if name.startswith(PREFIXES) or name in NAMES:
            monkeypatch.delenv(name)

    def set_vars(variables: dict[str, str]) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return set_vars


def test_no_launcher_is_one_process(environ):
    assert read_dist_env() == DistEnv()
    assert not read_dist_env().distributed


def test_torchrun(environ):
    environ(TORCHRUN)
    assert read_dist_env() == DistEnv(5, 8, 1, 4, "10.0.0.7", 29400, "torchrun")


def test_deepspeed_launcher_reads_as_torchrun_with_local_size(environ):
    environ(DEEPSPEED)
    assert read_dist_env() == DistEnv(1, 2, 1, 2, "127.0.0.1", 29500, "torchrun")


def test_srun_task(environ):
    environ(SLURM_STEP)
    # Master: the step's first node; port: derived from the job id so jobs sharing a node do not collide.
    assert read_dist_env() == DistEnv(3, 4, 1, 2, "node1", 20000 + 4242 % 10000, "slurm")


def test_slurm_batch_shell_is_not_a_task(environ):
    environ(SLURM_BATCH)  # SLURM_PROCID=0, SLURM_NTASKS=2, but no step: one process (it would hang waiting for 2)
    assert read_dist_env() == DistEnv()


def test_torchrun_under_srun_wins(environ):
    environ(SLURM_STEP | TORCHRUN)
    assert read_dist_env() == DistEnv(5, 8, 1, 4, "10.0.0.7", 29400, "torchrun")


def test_openmpi_inside_an_allocation_wins_over_slurm(environ):
    environ(SLURM_BATCH | OPENMPI | {"MASTER_ADDR": "n0"})
    assert read_dist_env() == DistEnv(6, 16, 2, 8, "n0", 20000 + 4242, "openmpi")


def test_mpich(environ):
    environ(MPICH)
    # One node (local size 2 < world 4 would be two): no MASTER_ADDR means the meeting point is unknown.
    env = read_dist_env()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.launcher) == (3, 4, 1, 2, "mpich")
    assert env.master_addr == ""


def test_mpi_on_one_node_meets_on_loopback(environ):
    environ(MPICH | {"MPI_LOCALNRANKS": "4"})
    assert read_dist_env().master_addr == "127.0.0.1"


def test_multi_node_mpi_without_master_addr_fails_at_init(environ):
    from bigmodel.parallel.env import init_distributed

    environ(OPENMPI)
    with pytest.raises(ValueError, match="MASTER_ADDR is not set and openmpi"):
        init_distributed(read_dist_env())


def test_an_address_that_does_not_resolve_fails_at_init_in_one_line(environ):
    # Without this check every rank retries its connection until the collective timeout (10 minutes) and ends
    # with a traceback. ".invalid" never resolves (RFC 2606).
    from bigmodel.parallel.env import init_distributed

    environ(SLURM_STEP | {"SLURM_STEP_NODELIST": "gpu-a.invalid,gpu-b.invalid"})
    with pytest.raises(ValueError, match=r"^rank 0's address 'gpu-a.invalid', the first node of the slurm step"):
        init_distributed(read_dist_env())
    environ(TORCHRUN | {"MASTER_ADDR": "nohost.invalid"})
    with pytest.raises(ValueError, match=r"^rank 0's address 'nohost.invalid', from MASTER_ADDR, does not resolve"):
        init_distributed(read_dist_env())


def test_malformed_variable_is_one_line(environ):
    environ(TORCHRUN | {"RANK": "three"})
    with pytest.raises(ValueError, match=r"RANK='three' is not an integer"):
        read_dist_env()


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("node[1-2]", ["node1", "node2"]),
        ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
        ("a1,b[9-10]", ["a1", "b9", "b10"]),
        ("single", ["single"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_tasks_on_node():
    assert [tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    assert tasks_on_node("4", 0) == 4


def test_collective_timeout(environ, monkeypatch):
    assert collective_timeout_s() == 600
    monkeypatch.setenv("BIGMODEL_COLLECTIVE_TIMEOUT", "30")
    assert collective_timeout_s() == 30
    monkeypatch.setenv("BIGMODEL_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="BIGMODEL_COLLECTIVE_TIMEOUT='soon' must be a positive number"):
        collective_timeout_s()
