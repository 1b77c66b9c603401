"""`python -m bigmodel.eval CHECKPOINT --task ... [options]`: `bigmodel eval`, in the form torchrun and srun start."""

import sys

from bigmodel.cli.main import main

sys.exit(main(["eval", *sys.argv[1:]]))
