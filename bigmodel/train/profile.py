"""torch.profiler over chosen training steps (`log.profile_step`, `log.profile_steps`): a Chrome / Perfetto trace and a
per-operator table per rank, written into `<run_dir>/profile/`."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function


class StepProfiler:
    """Profiles steps `first` .. `first + count - 1` (clipped to `last`, the run's last step) of this rank; `first`
    0 profiles nothing. Call `step(n)` around each training step; the files are written when the last one ends:
    `rank<r>.json.gz` (open in https://ui.perfetto.dev or chrome://tracing; each profiled step is a `step <n>` span)
    and `rank<r>.txt` (operators by self time: the CPU's, and the GPU's where there is one)."""

    def __init__(self, first: int, count: int, last: int, out_dir: Path, rank: int, is_main: bool) -> None:
        self.first, self.last = first, min(first + count - 1, last)
        self.out_dir, self.rank, self.is_main = out_dir, rank, is_main
        self.profiler: profile | None = None
        self.profiled: list[int] = []

    @contextlib.contextmanager
    def step(self, step: int):
        """The block runs step `step`, profiled if it is one of the chosen steps. A step that raises ends the
        profile there, and what was recorded is written (the trace of the failing step included)."""
        if not self.first or not self.first <= step <= self.last:
            yield
            return
        if self.profiler is None:
            cuda = torch.cuda.is_available()
            activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
            self.profiler = profile(activities=activities, record_shapes=True)
            self.profiler.start()
        self.profiled.append(step)
        try:
            with record_function(f"step {step}"):
                yield
        except BaseException:
            self.close()
            raise
        if step == self.last:
            self.close()

    def close(self) -> None:
        """Write what has been profiled, if a profile is still open: after the last chosen step, or where the run
        ends before it (a stop signal, an error)."""
        if self.profiler is not None:
            self._write()

    def _write(self) -> None:
        self.profiler.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace, table = self.out_dir / f"rank{self.rank}.json.gz", self.out_dir / f"rank{self.rank}.txt"
        self.profiler.export_chrome_trace(str(trace))
        by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table.write_text(self.profiler.key_averages().table(sort_by=by, row_limit=40) + "\n", encoding="utf-8")
        self.profiler = None
        if self.is_main:
            first, last = self.profiled[0], self.profiled[-1]
            steps = f"step {first}" if first == last else f"steps {first}-{last}"
            print(
                f"profile of {steps}: {self.out_dir} (rank<r>.json.gz: trace for ui.perfetto.dev; rank<r>.txt: "
                "operators by self time)",
                file=sys.stderr,
            )
