"""Pipeline bubble: measured idle fraction of training steps against the theory (p - 1) / (m + p - 1).

Trains a model large enough that compute dominates communication (two towers of 8 blocks, width 512) with p = 2
pipeline ranks and m = 8 microbatches, records the timelines of steps 3-5 and prints the median step's measured idle
fraction beside the theory, which assumes stages of equal cost (the towers are made identical so that they are),
and beside a replay of the recorded operations with instant communication (what the stage times alone explain).
Writes the run (with timeline.png and timeline.json) to --out. The run itself is
`bigmodel.bench.pipeline.run_bubble`, which `bigmodel bench --only pipeline` also uses. Usage:

    python bench/pipeline_bubble.py --out runs/bench-bubble [--schedule 1f1b] [--microbatches 8] [--microbatch-size 32]
        [--width 512] [--layers 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bigmodel.bench.pipeline import run_bubble


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-bubble")
    parser.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b"])
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--microbatch-size", type=int, default=32, help="samples per microbatch (compute per op)")
    parser.add_argument("--width", type=int, default=512, help="width of both towers")
    parser.add_argument("--layers", type=int, default=8, help="blocks per tower (one tower per stage)")
    parser.add_argument("--steps", type=int, default=3, help="steps recorded after 2 warm-up steps (median reported)")
    args = parser.parse_args()
    try:
        summary = run_bubble(
            Path(args.out),
            args.schedule,
            args.microbatches,
            args.microbatch_size,
            False,
            args.width,
            args.layers,
            args.steps,
        )
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
