"""Preemption: a signal only sets a flag; the trainer acts on it at a step boundary.

Slurm sends SIGUSR1 (``--signal=B:USR1@N``) before the time limit or on preemption, and SIGTERM
when it cancels. Doing real work inside a signal handler (collectives, file writes) can deadlock,
so the handler records the signal and the trainer agrees on it across ranks at the next step.
"""
from __future__ import annotations

import signal
from typing import Optional

import torch


class PreemptionFlag:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some Ray worker setups): cannot install
                pass
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        self.signum = signum

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def agreed(self, layout) -> bool:
        """True on every rank when any rank got a signal (one tiny all-reduce per step)."""
        flag = torch.tensor([1 if self.signum is not None else 0], dtype=torch.int32)
        return bool(layout.all_reduce_max(flag).item())
