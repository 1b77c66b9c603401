"""Run every side-by-side benchmark at full size and write runs/bench/ (JSON, table.md, ratios.png).

    python bench/run_all.py [--out runs/bench] [--only clip ...]

The same as `bigmodel bench`; kept here beside the other benchmark scripts.
"""

from __future__ import annotations

import sys

from bigmodel.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
