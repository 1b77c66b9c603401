"""Side-by-side benchmarks: every figure is a ratio of two things measured in the same run, interleaved.

`bigmodel bench` (bigmodel/cli/bench.py) runs them, writes one JSON file per benchmark and a summary, a Markdown
table and PNG charts. `quick=True` shrinks every benchmark to seconds (used by tests/unit/bench/test_suite.py); its
figures check the plumbing, not the machine.
"""
