"""Stopping a job cleanly when the scheduler asks: a signal becomes a request that every rank acts on after the
same step.

Slurm sends SIGUSR1 (`--signal`) some time before preemption or the time limit and SIGTERM when it cancels;
Kubernetes and torchrun send SIGTERM. A process that gets one finishes the step it is in; then all ranks agree
(one all-reduce per step), save a checkpoint and leave with status 0, so the job can be requeued and resumed with
`--resume auto`.
"""

from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
REPEAT_GRACE_S = 2.0


class StopRequest:
    """Records STOP_SIGNALS while installed; `agreed()` tells every rank whether any rank got one."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.installed = False
        self._received_at = 0.0
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> StopRequest:
        """Catch STOP_SIGNALS from now on (only possible on the main thread; elsewhere this does nothing)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
            self.installed = True
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before install()."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
        self.installed = False

    def _record(self, signum: int, frame) -> None:
        # Asked again later (e.g. the job is stuck in a collective): stop now, the default way. A repeat within
        # REPEAT_GRACE_S is the same request arriving twice (from the scheduler and from torchrun's agent).
        if self.received == signum and time.monotonic() - self._received_at > REPEAT_GRACE_S:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        if self.received is None:
            self.received, self._received_at = signal.Signals(signum), time.monotonic()

    def agreed(self, group: dist.ProcessGroup | None, device: torch.device) -> signal.Signals | None:
        """The signal some rank received (the highest-numbered if they differ), or None. Every rank of `group`
        calls it at the same point (all or none of them installed); without a process group it only looks."""
        if not self.installed or not dist.is_initialized():
            return self.received
        code = torch.tensor([int(self.received or 0)], device=device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX, group=group)
        return signal.Signals(int(code.item())) if code.item() else None
