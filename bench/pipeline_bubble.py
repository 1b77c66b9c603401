"""Pipeline bubble: measured idle fraction of one training step against the theory (p - 1) / (m + p - 1).

Trains a model large enough that compute dominates communication (two towers of 6 blocks, width 256) with p = 2
pipeline ranks and m = 8 microbatches, records the timeline of step 3 and prints the measured idle fraction beside
the theory, which assumes stages of equal cost (the towers are made identical so that they are), and beside a
replay of the recorded operations with instant communication (what the stage times alone explain). Writes the run
(with timeline.png and timeline.json) to --out. The run itself is `bigmodel.bench.pipeline.run_bubble`, which
`bigmodel bench --only pipeline` also uses. Usage:

    python bench/pipeline_bubble.py --out runs/bench-bubble [--schedule 1f1b] [--microbatches 8] [--microbatch-size 64]
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
    parser.add_argument("--microbatch-size", type=int, default=64, help="samples per microbatch (compute per op)")
    args = parser.parse_args()
    try:
        summary = run_bubble(Path(args.out), args.schedule, args.microbatches, args.microbatch_size)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
