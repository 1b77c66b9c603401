"""`bigmodel verify`: check that parallel layouts reproduce the single-process run before a large job."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bigmodel.cli.common import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="compare parallel layouts with the single-process reference",
        description="Trains --steps steps on one process (the reference) and in each layout (under torchrun, "
        "grouped by world size) with the same seed and global batch, prints the largest loss and gradient "
        "deviations per layout, and exits 1 if any is beyond tolerance. Layouts: dp2, zero1x2, zero2x2, zero3x4, "
        "tp2, tp2+sp, dp2xtp2, dp2xtp2xzero3, hsdp2x2, ... (parts joined by x or +).",
    )
    add_config_arguments(parser)
    parser.add_argument("--layouts", required=True, help="comma-separated layout names, e.g. dp2,tp2,zero3x4")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (default 10)")
    parser.add_argument("--loss-rtol", type=float, default=None, help="relative loss tolerance (fp32: 1e-5)")
    parser.add_argument(
        "--grad-rtol",
        type=float,
        default=None,
        help="gradient tolerance relative to the model's largest gradient element (fp32: 1e-6)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the comparison to FILE as JSON")
    parser.set_defaults(func=run, takes_overrides=True)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from bigmodel.tools.verify import format_table, verify

    layouts = [name for name in args.layouts.split(",") if name]
    with tempfile.TemporaryDirectory(prefix="bigmodel-verify-") as workdir:
        try:
            report = verify(
                args.config, args.overrides, layouts, args.steps, Path(workdir), args.loss_rtol, args.grad_rtol
            )
        except RuntimeError as err:  # a layout's job failed; its output's tail is in the message
            print(f"error: {err}", file=sys.stderr)
            return 1
    print(format_table(report.comparisons, report.loss_rtol, report.grad_rtol))
    if args.json:
        summary = {
            "loss_rtol": report.loss_rtol,
            "grad_rtol": report.grad_rtol,
            "reference_losses": report.reference.losses,
            "layouts": [
                asdict(c)
                | {"passed": c.passed(report.loss_rtol, report.grad_rtol), "losses": report.traces[c.layout].losses}
                for c in report.comparisons
            ],
        }
        Path(args.json).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return 0 if report.passed else 1
