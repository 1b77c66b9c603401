"""`python -m bigmodel.train --config FILE [--section.key=value ...]`: the form torchrun, deepspeed and srun start."""

import sys

from bigmodel.cli.main import main

sys.exit(main(["train", *sys.argv[1:]]))
