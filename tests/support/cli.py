"""Running the `bigmodel` command line in a subprocess from the repository root, as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bigmodel(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`bigmodel ARGS...` (through this interpreter), its output captured as text; `env` replaces the environment."""
    return subprocess.run(
        [sys.executable, "-m", "bigmodel.cli.main", *args], cwd=ROOT, capture_output=True, text=True, env=env
    )
