"""Two "nodes" on this machine train exactly what one 4-process `bigmodel launch` trains:
- two `bigmodel launch --nnodes 2` commands (2 processes each) meeting at a c10d rendezvous on 127.0.0.1;
- one `bigmodel launch --launcher deepspeed --hostfile` command, whose launcher starts both nodes over ssh with pdsh,
  as on a cluster;
- one `mpirun` of Open MPI or of MPICH (hydra) across node0 and node1, which starts its daemons on both over ssh.
The ssh hosts are emulated by launch/ssh_hosts.sh (an sshd on a loopback port, host names node0 and node1)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
SSH_HOSTS = ROOT / "launch" / "ssh_hosts.sh"
RUN = [
    "--parallel.dp_shard=2",
    "--parallel.dp_replicate=2",
    "--train.steps=5",
    "--log.every=1",
    "--log.progress=false",
    "--log.wandb=disabled",
    "--checkpoint.save_final=false",
    "--data.eval_size=32",
    "--train.eval_batch_size=32",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bigmodel.cli.main", "launch", "--config", TINY, *RUN, *args]
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen) -> tuple[str, str]:
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"launch still running after 300 s:\n{err[-3000:]}") from None
    assert process.returncode == 0, err[-3000:]
    return out, err


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> list[float]:
    """The losses of the reference: one node, 4 processes, the same layout."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    finish(launch("--nproc", "4", f"--train.out_dir={run_dir}"))
    assert len(losses(run_dir)) == 5
    return losses(run_dir)


@pytest.mark.slow
def test_two_nodes_over_loopback_match_one_node(tmp_path, one_node):
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        launch(
            "--nproc",
            "2",
            "--nnodes",
            "2",
            "--node-rank",
            str(rank),
            "--rdzv-endpoint",
            endpoint,
            f"--train.out_dir={tmp_path / 'two'}",
        )
        for rank in (0, 1)
    ]
    outputs = [finish(node) for node in nodes]
    assert sum(out.count("run directory:") for out, _ in outputs) == 1, "one process in the job prints the summary"
    # The same 4 ranks, layout, seed and batches; the rendezvous only decides which agent hosts which ranks, and
    # every rank runs the same collectives in the same order: identical losses (measured: bit for bit).
    assert losses(tmp_path / "two") == one_node


@pytest.fixture(scope="module")
def ssh_hosts(tmp_path_factory):
    """Hosts node0 and node1, both this machine behind an sshd on a loopback port; yields the environment whose PATH
    has the ssh that reaches them, and the hostfile listing them."""
    needed = ("pdsh", "sshd", "mpiexec.openmpi", "mpiexec.hydra")
    installed = all(shutil.which(b, path=f"{os.environ['PATH']}:/usr/sbin") for b in needed)
    if not installed and os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail(
                "the ssh launch tests need openssh-server, pdsh, openmpi-bin and mpich, or root to install them"
            )
        pytest.skip(
            "openssh-server, pdsh, openmpi-bin or mpich is missing (launch/ssh_hosts.sh up installs them as root)"
        )
    state = tmp_path_factory.mktemp("ssh")
    env = {**os.environ, "BIGMODEL_SSH_DIR": str(state / "hosts"), "BIGMODEL_SSH_PORT": str(free_port())}
    up = subprocess.run([str(SSH_HOSTS), "up", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, f"emulated ssh hosts did not start:\n{up.stdout}\n{up.stderr}"
    yield {**env, "PATH": f"{state / 'hosts' / 'bin'}:{env['PATH']}"}, state / "hosts"
    subprocess.run([str(SSH_HOSTS), "down"], env=env, capture_output=True, timeout=60)


@pytest.mark.slow
def test_deepspeed_launcher_starts_two_hosts_over_ssh(tmp_path, one_node, ssh_hosts):
    # What a multi-node deepspeed launch does on a cluster: this command runs on the first host only; the launcher
    # reaches both hosts over ssh (pdsh), and each starts its 2 workers with its node rank (pdsh's %n).
    env, hosts = ssh_hosts
    node = launch(
        "--launcher",
        "deepspeed",
        "--hostfile",
        str(hosts / "hostfile"),
        "--nnodes",
        "2",
        "--nproc",
        "2",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        f"--train.out_dir={tmp_path / 'ssh'}",
        env=env,
    )
    log = "\n".join(finish(node))
    assert "cmd = pdsh -S" in log and "-w node0,node1" in log, "the launcher started the hosts over pdsh"
    assert "node0: " in log and "node1: " in log, "both hosts ran workers"
    assert losses(tmp_path / "ssh") == one_node


def test_an_unreachable_host_is_a_one_line_error_before_anything_starts(tmp_path, ssh_hosts):
    # The deepspeed launcher checks only the first host; bigmodel launch checks every host it will use, at once.
    env, _ = ssh_hosts
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnohost.invalid slots=2\n")
    node = launch(
        "--launcher", "deepspeed", "--hostfile", str(hostfile), "--nnodes", "2", "--nproc", "2",
        f"--train.out_dir={tmp_path / 'run'}", env=env,
    )  # fmt: skip
    _, err = node.communicate(timeout=120)
    assert node.returncode == 2
    assert err.strip().splitlines()[-1].startswith(f"error: cannot reach nohost.invalid of {hostfile} over ssh")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mpi", ["openmpi", "mpich"])
def test_mpirun_starts_two_hosts_over_ssh(tmp_path, one_node, ssh_hosts, mpi):
    # MPI as on a cluster without Slurm: mpirun reaches each host over ssh and starts 2 processes there; the workers
    # read OMPI_COMM_WORLD_* (Open MPI) or PMI_* and MPI_LOCAL* (MPICH) and meet at the exported
    # MASTER_ADDR:MASTER_PORT (docs/launching.md).
    env, hosts = ssh_hosts
    logins = (hosts / "sshd.log").read_text().count("Accepted publickey")
    port = free_port()
    if mpi == "openmpi":
        cmd = ["mpiexec.openmpi", "--host", "node0:2,node1:2", "-np", "4", "-x", "MASTER_ADDR=127.0.0.1", "-x"]
        cmd += [f"MASTER_PORT={port}", "-x", "OMP_NUM_THREADS=1", "-x", "PATH"]
        cmd += ["--allow-run-as-root"] if os.geteuid() == 0 else []
    else:
        cmd = ["mpiexec.hydra", "-hosts", "node0:2,node1:2", "-n", "4", "-launcher", "ssh"]
        cmd += ["-genv", "MASTER_ADDR", "127.0.0.1", "-genv", "MASTER_PORT", str(port), "-genv", "OMP_NUM_THREADS", "1"]
    cmd += [sys.executable, "-m", "bigmodel.train", "--config", TINY, *RUN, f"--train.out_dir={tmp_path / 'mpi'}"]
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    finish(job)
    assert (hosts / "sshd.log").read_text().count("Accepted publickey") >= logins + 2, "both hosts reached over ssh"
    assert losses(tmp_path / "mpi") == one_node
