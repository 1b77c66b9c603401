"""`bigmodel slurm submit|status|cancel`: training runs as Slurm batch jobs (library: bigmodel.launch.slurm)."""

from __future__ import annotations

import argparse
import sys

from bigmodel.cli.common import add_config_arguments

STATUS_FIELDS = (
    "JobId",
    "JobName",
    "JobState",
    "Reason",
    "ExitCode",
    "RunTime",
    "TimeLimit",
    "NodeList",
    "Restarts",
    "StdOut",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `slurm` command to `subparsers`."""
    parser = subparsers.add_parser(
        "slurm",
        help="submit a training run as a Slurm job; status, cancel",
        description="Training runs as Slurm batch jobs: srun starts one torchrun agent per node, the agents meet "
        "at the first node's address, and a job stopped by its warning signal saves a checkpoint, requeues itself "
        "and resumes (see docs/slurm.md).",
    )
    commands = parser.add_subparsers(dest="slurm_command", required=True, metavar="COMMAND")

    submit = commands.add_parser(
        "submit",
        help="write the batch script into the run directory and sbatch it",
        description="Writes <train.out_dir>/slurm/job.sbatch (and the resolved config beside it), submits it with "
        "sbatch and prints the job id. Logs go to <train.out_dir>/slurm/JOBID.out.",
    )
    add_config_arguments(submit)
    submit.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
    submit.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (one process per GPU)")
    submit.add_argument(
        "--nproc-per-node",
        type=int,
        default=0,
        help="processes per node (default: GPUs per node; required on CPU nodes)",
    )
    for option, text in (
        ("--partition", "partition (queue)"),
        ("--account", "account to charge"),
        ("--time", "time limit, e.g. 04:00:00"),
        ("--qos", "quality of service"),
        ("--constraint", "node features, e.g. a100"),
        ("--job-name", "job name (default: the run directory's name)"),
        ("--container-image", "run in this image with pyxis/enroot (srun --container-image)"),
        ("--container-mounts", "further SRC:DST mounts for the container (the run directory is always mounted)"),
    ):
        submit.add_argument(option, default="", help=text)
    submit.add_argument("--cpus-per-task", type=int, default=0, help="CPUs per node's agent (its processes share them)")
    submit.add_argument(
        "--signal",
        default="USR1@120",
        help="warning before the time limit, SIGNAL@SECONDS; USR1 saves a checkpoint and requeues (default USR1@120)",
    )
    submit.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a worker fails")
    submit.add_argument(
        "--sbatch-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="another #SBATCH option, e.g. --sbatch-option=--exclusive (repeatable)",
    )
    submit.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    submit.add_argument(
        "--wait", action="store_true", help="wait for the job to end (through requeues) and exit with its exit code"
    )
    submit.set_defaults(func=run_submit, takes_overrides=True)

    status = commands.add_parser("status", help="state, exit code, nodes and log of a job")
    status.add_argument("job_id", metavar="JOBID")
    status.set_defaults(func=run_status)

    cancel = commands.add_parser("cancel", help="cancel a job, or signal it (--signal USR1: save and requeue)")
    cancel.add_argument("job_id", metavar="JOBID")
    cancel.add_argument("--signal", default="", help="send this signal to the training processes instead, e.g. USR1")
    cancel.set_defaults(func=run_cancel)


def run_submit(args: argparse.Namespace) -> int:
    from bigmodel.launch import slurm

    job = slurm.SlurmJob(
        config=args.config,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        nproc_per_node=args.nproc_per_node,
        overrides=tuple(args.overrides),
        partition=args.partition,
        account=args.account,
        time=args.time,
        qos=args.qos,
        constraint=args.constraint,
        cpus_per_task=args.cpus_per_task,
        job_name=args.job_name,
        container_image=args.container_image,
        container_mounts=args.container_mounts,
        signal=args.signal,
        max_restarts=args.max_restarts,
        sbatch_options=tuple(args.sbatch_option),
    )
    prepared = slurm.prepare_job(job)
    if args.dry_run:
        print(prepared.script, end="")
        print(f"(dry run: would write {prepared.script_path} and run `sbatch {prepared.script_path}`)", file=sys.stderr)
        return 0
    slurm.write_job(prepared)
    try:
        job_id = slurm.submit(prepared.script_path)
    except slurm.SlurmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(job_id)
    print(
        f"submitted job {job_id}: script {prepared.script_path}, log {prepared.run_dir}/slurm/{job_id}.out",
        file=sys.stderr,
    )
    if not args.wait:
        return 0
    info = slurm.wait_for_job(job_id, timeout_s=float("inf"))
    print(f"job {job_id} {info['JobState']} (exit code {info.get('ExitCode')})", file=sys.stderr)
    return slurm.exit_code(info)


def run_status(args: argparse.Namespace) -> int:
    from bigmodel.launch import slurm

    try:
        info = slurm.job_status(args.job_id)
    except slurm.SlurmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for key in STATUS_FIELDS:
        if key in info:
            print(f"{key}: {info[key]}")
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    from bigmodel.launch import slurm

    try:
        slurm.cancel(args.job_id, args.signal)
    except slurm.SlurmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    done = f"sent SIG{args.signal.removeprefix('SIG')} to" if args.signal else "cancelled"
    print(f"{done} job {args.job_id}", file=sys.stderr)
    return 0
