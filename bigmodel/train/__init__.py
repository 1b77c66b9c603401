"""The training loop, optimizer, schedule, evaluation and metrics. Start a run with `python -m bigmodel.train`."""
