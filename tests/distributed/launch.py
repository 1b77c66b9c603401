"""Starting real multi-process jobs from tests: torchrun on the gloo backend, results handed back as JSON.

Each launch costs seconds here (4-15 s for 2-4 processes on 2 cores), so a worker script runs several checks per
launch and writes one JSON file that the test reads and asserts on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def torchrun(nproc: int, script: str | Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the worker script at `script` (it sits next to the test that starts it) under torchrun with `nproc`
    processes.

    Raises AssertionError with the workers' output if the job fails or times out.
    """
    path = Path(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(path), *args]
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{path.name} x{nproc} timed out after {timeout} s:\n{err.stdout}\n{err.stderr}") from None
    if result.returncode != 0:
        raise AssertionError(f"{path.name} x{nproc} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def run_worker(nproc: int, script: str, out: Path, *args: str, timeout: float = 600) -> dict:
    """torchrun `script` with `--out OUT` and return the JSON rank 0 wrote there."""
    torchrun(nproc, script, "--out", str(out), *args, timeout=timeout)
    return json.loads(out.read_text())
