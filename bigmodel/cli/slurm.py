"""`bigmodel slurm` (being built; registers nothing yet)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `slurm` command to `subparsers`."""
