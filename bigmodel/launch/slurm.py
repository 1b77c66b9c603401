"""Slurm jobs for training runs: the batch script (srun starts one torchrun agent per node, the agents meet at the
first node's address), submission with sbatch, status, cancel and waiting.

Preemption: the job asks Slurm for a warning signal (`#SBATCH --signal=USR1@SECONDS` before the time limit, or
`scancel --signal=USR1 JOB` at any time). Slurm signals every process of the job step; the torchrun agents ignore
USR1 and TERM, so each training process gets the signal exactly once, finishes its step, saves a checkpoint, writes
`<run_dir>/stopped.json` and exits 0. The batch script then requeues the job (`scontrol requeue`, allowed by
`#SBATCH --requeue`), and every start runs `--resume auto`, so the job continues from that checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bigmodel.config import Config, load_config, save_config
from bigmodel.config.validate import resolve_dp_shard
from bigmodel.launch.commands import TorchrunSpec, restart_environment, torchrun_command
from bigmodel.parallel.dims import ParallelDims

# States after which a job does not run again (a requeued job goes back to PENDING instead).
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
# Signals the torchrun agent keeps catching (and forwarding); USR1 and TERM go straight to the workers.
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
# SlurmJob fields passed to sbatch as they are.
SCHEDULING_OPTIONS = ("partition", "account", "time", "qos", "constraint")


class SlurmError(RuntimeError):
    """A Slurm command is missing or refused a request; the message is one line saying what to do."""


@dataclass(frozen=True)
class SlurmJob:
    """A training run as a Slurm job: `nodes` nodes, each running `nproc_per_node` training processes under one
    torchrun agent (by default one per GPU, `gpus_per_node`; on CPU nodes give `nproc_per_node`)."""

    config: str
    nodes: int
    gpus_per_node: int = 0
    nproc_per_node: int = 0
    overrides: tuple[str, ...] = ()
    partition: str = ""
    account: str = ""
    time: str = ""
    qos: str = ""
    constraint: str = ""
    cpus_per_task: int = 0
    job_name: str = ""
    container_image: str = ""
    container_mounts: str = ""
    signal: str = "USR1@120"
    """The warning Slurm sends before the time limit, SIGNAL@SECONDS (sbatch --signal)."""
    max_restarts: int = 0
    sbatch_options: tuple[str, ...] = ()
    """Further `#SBATCH` options as given to sbatch, e.g. "--exclusive" or "--mem=0"."""

    @property
    def processes_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node


@dataclass(frozen=True)
class PreparedJob:
    """A job ready to submit: its run directory, the batch script's path and text."""

    run_dir: Path
    script_path: Path
    script: str
    config_path: Path
    config: Config = field(repr=False)


def prepare_job(job: SlurmJob, python: str | None = None) -> PreparedJob:
    """Validate `job` and its config (the layout must fit nodes x processes per node) and build its batch script.

    Nothing is written yet (see write_job). The resolved config is frozen into `<run_dir>/slurm/config.yaml`, so a
    requeued job trains exactly what was submitted. Raises ConfigError or ValueError (one line) on bad input.
    """
    if job.nodes < 1:
        raise ValueError(f"--nodes must be at least 1, got {job.nodes}")
    if job.processes_per_node < 1:
        raise ValueError("give --gpus-per-node G (one process per GPU) or, on CPU nodes, --nproc-per-node P")
    if not re.fullmatch(r"(R:)?(SIG)?[A-Z0-9]+(@\d+)?", job.signal):
        raise ValueError(
            f"--signal {job.signal!r} must look like USR1@120 (signal @ seconds before the time limit; not B:, "
            "which would signal only the batch shell and not the training processes)"
        )
    if any(o.lstrip("-").startswith("checkpoint.resume=") for o in job.overrides):
        raise ValueError(
            "a Slurm job always resumes the newest checkpoint of its run (--resume auto); drop --checkpoint.resume "
            "and copy the checkpoint into the run's checkpoints/ folder to start from it"
        )
    cfg = load_config(job.config, job.overrides)
    resolve_dp_shard(cfg, job.nodes * job.processes_per_node)
    ParallelDims.from_config(cfg).validate(job.nodes * job.processes_per_node, cfg)
    run_dir = Path(cfg.train.out_dir).resolve()
    if "$" in str(run_dir) or "'" in str(run_dir):
        raise ValueError(f"train.out_dir {run_dir} contains $ or '; choose a plain path")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(run_dir)))
    config_path = run_dir / "slurm" / "config.yaml"
    python = python or ("python" if job.container_image else sys.executable)
    script = batch_script(job, run_dir, config_path, python, cfg.train.steps)
    return PreparedJob(run_dir, run_dir / "slurm" / "job.sbatch", script, config_path, cfg)


def write_job(prepared: PreparedJob) -> None:
    """Write the frozen config and the batch script into `<run_dir>/slurm/`."""
    prepared.script_path.parent.mkdir(parents=True, exist_ok=True)
    save_config(prepared.config, prepared.config_path)
    prepared.script_path.write_text(prepared.script, encoding="utf-8")
    prepared.script_path.chmod(0o755)


def _shell_words(cmd: list[str], expand: bool = True) -> str:
    """Quote for the batch shell: with `expand`, words naming shell variables ($...) in double quotes so the batch
    shell fills them in; everything else literal."""
    return " ".join(f'"{word}"' if expand and "$" in word else shlex.quote(word) for word in cmd)


def _agent_signals_supported() -> bool:
    """torchrun's --signals-to-handle exists (torch >= 2.8)."""
    from torch.distributed.launcher.api import LaunchConfig

    return "signals_to_handle" in {f.name for f in dataclasses.fields(LaunchConfig)}


def batch_script(job: SlurmJob, run_dir: Path, config_path: Path, python: str, steps: int) -> str:
    """The sbatch script for `job`, logging into `<run_dir>/slurm/` and training `config_path`."""
    name = job.job_name or run_dir.name
    options = [
        f"--job-name={name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",  # one torchrun agent per node; it starts the node's training processes
        *([f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []),
        *([f"--cpus-per-task={job.cpus_per_task}"] if job.cpus_per_task else []),
        *(f"--{key}={getattr(job, key)}" for key in SCHEDULING_OPTIONS if getattr(job, key)),
        f"--output={run_dir}/slurm/%j.out",
        "--open-mode=append",  # a requeued job appends to its log instead of replacing it
        f"--signal={job.signal}",
        "--requeue",
        *job.sbatch_options,
    ]
    spec = TorchrunSpec(
        nproc_per_node=job.processes_per_node,
        nnodes=job.nodes,
        node_rank="$SLURM_NODEID",  # the c10d rendezvous assigns ranks; this only labels the agents' logs
        rdzv_endpoint="$RDZV_ENDPOINT",
        max_restarts=job.max_restarts,
        rdzv_id="$SLURM_JOB_ID",
        log_dir=f"{run_dir}/slurm/torchrun-$SLURM_JOB_ID",
        agent_signals=AGENT_SIGNALS if _agent_signals_supported() else "",
    )
    torchrun = torchrun_command(spec, ["--config", str(config_path), "--resume", "auto"], python=python)
    srun = ["srun", "--kill-on-bad-exit=1"]
    if job.container_image:
        mounts = ",".join(filter(None, [f"{run_dir}:{run_dir}", job.container_mounts]))
        srun += [f"--container-image={job.container_image}", f"--container-mounts={mounts}"]
    agent = ["bash", "-c", 'trap "" USR1 TERM; exec "$@"', "torchrun-agent"]
    stopped = run_dir / "stopped.json"
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"# Written by `bigmodel slurm submit` at {datetime.datetime.now().isoformat(timespec='seconds')}: "
        f"{job.nodes} node(s) x {job.processes_per_node} process(es), {steps} steps of {job.config}.",
        "# Submit again as is (`sbatch THIS_FILE`): every start resumes the newest checkpoint of the run.",
        *(f"#SBATCH {option}" for option in options),
        "",
        "set -uo pipefail  # no -e: the script reads srun's status itself",
        "export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
        *(
            f"export {k}={v}  # restarts need a fresh store (pytorch issue 135712)"
            for k, v in restart_environment(job.max_restarts).items()
        ),
        "",
        "# The agents meet at the first node's address (its name need not resolve) on a port derived from the job id.",
        'first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "rdzv_host=$(scontrol show node \"$first_node\" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)",
        'export RDZV_ENDPOINT="${rdzv_host:-$first_node}:$((20000 + SLURM_JOB_ID % 10000))"',
        'echo "job $SLURM_JOB_ID (start $((${SLURM_RESTART_COUNT:-0} + 1))) on $SLURM_JOB_NODELIST, '
        'rendezvous at $RDZV_ENDPOINT"',
        "# A stop record of the previous start goes into the job's folder: stopped.json is this start's alone.",
        f'[ -f {q(str(stopped))} ] && mv {q(str(stopped))} "{run_dir}/slurm/stopped-$SLURM_JOB_ID-$(date +%s).json"',
        "",
        "# One torchrun agent per node. Slurm signals every process of the step; the agent ignores USR1 and TERM",
        "# (and torchrun is told not to catch TERM), so each training process gets a signal once: it finishes its",
        "# step, saves a checkpoint, writes stopped.json and exits 0.",
        f"{_shell_words(srun)} \\\n    {_shell_words(agent, expand=False)} \\\n    {_shell_words(torchrun)}",
        "status=$?",
        "",
        "# Stopped by the warning signal (USR1): go back to the queue; the next start resumes from the checkpoint.",
        f"if [ -f {q(str(stopped))} ] && grep -q '\"SIGUSR1\"' {q(str(stopped))}; then",
        '    echo "job $SLURM_JOB_ID stopped on SIGUSR1 with a checkpoint; requeueing"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "fi",
        "exit $status",
        "",
    ]
    return "\n".join(lines)


def _run(cmd: list[str], what: str) -> str:
    """stdout of a Slurm command; SlurmError (one line) if it is missing or fails."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found: run on a Slurm login node (or use --dry-run)") from None
    if result.returncode != 0:
        message = (result.stderr.strip() or result.stdout.strip() or f"exit code {result.returncode}").splitlines()
        raise SlurmError(f"{what}: {message[-1].removeprefix(f'{cmd[0]}: error: ')}")
    return result.stdout


def submit(script_path: Path) -> str:
    """Submit the batch script with sbatch and return the job id."""
    out = _run(["sbatch", "--parsable", str(script_path)], "sbatch refused the job")
    return out.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    """The job's fields as `scontrol show job` reports them (JobState, ExitCode, NodeList, Restarts, StdOut, ...)."""
    out = _run(["scontrol", "show", "job", "-o", str(job_id)], f"no job {job_id}")
    return dict(re.findall(r"(\S+?)=(\S*)", out.strip().splitlines()[0]))


def job_status(job_id: str) -> dict[str, str]:
    """job_info, or for a job scontrol has forgotten (ended more than MinJobAge ago) the accounting record."""
    try:
        return job_info(job_id)
    except SlurmError as err:
        try:
            fields = "JobID,JobName,State,ExitCode,Elapsed,NodeList"
            out = _run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", fields], "sacct")
        except SlurmError:
            raise err from None
        if not out.strip():
            raise err from None
        keys = ("JobId", "JobName", "JobState", "ExitCode", "RunTime", "NodeList")
        return dict(zip(keys, out.strip().splitlines()[0].split("|"), strict=False))


def cancel(job_id: str, signal: str = "") -> None:
    """scancel the job, or with `signal` (e.g. USR1) only signal its training processes (USR1: save and requeue)."""
    job_info(job_id)  # plain scancel says nothing, and exits 0, for a job that does not exist
    _run(["scancel", *([f"--signal={signal}"] if signal else []), str(job_id)], f"scancel {job_id}")


def wait_for_job(job_id: str, timeout_s: float = 3600, poll_s: float = 0.5) -> dict[str, str]:
    """Poll until the job reaches a final state (following requeues) and return its info; TimeoutError if not
    within `timeout_s`. (`sbatch --wait` polls at 2, 10 and 42 s; this notices the end within `poll_s`.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        info = job_info(job_id)
        if info.get("JobState") in FINAL_STATES:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def exit_code(info: dict[str, str]) -> int:
    """The job's exit status from scontrol's ExitCode=STATUS:SIGNAL (128 + signal if a signal ended it)."""
    status, _, signal = info.get("ExitCode", "0:0").partition(":")
    return int(status) or (128 + int(signal) if signal and signal != "0" else 0)
