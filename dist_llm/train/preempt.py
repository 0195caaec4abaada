"""Preemption: a signal (or a file) only sets a flag; the trainer acts on it at a step boundary.

Slurm sends SIGUSR1 (``--signal=B:USR1@N``) before the time limit or on preemption, and SIGTERM
when it cancels. Doing real work inside a signal handler (collectives, file writes) can deadlock,
so the handler records the signal and the trainer agrees on it across ranks at the next step.

Python installs signal handlers only from the main thread. Ray Train runs the training function
in a worker thread, so there the handler cannot be installed: that is logged as a warning naming
the reason, and the file path below is the way to preempt such a run. Every rank checks for
``<run_dir>/PREEMPT`` at each step (one ``stat``); when any rank sees it, all ranks save, the
file is removed (so the restarted job does not stop again at once) and the job exits with the
requeue code. ``touch <run_dir>/PREEMPT`` works for every launcher.
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger("dist_llm.train")

PREEMPT_FILE = "PREEMPT"


class PreemptionFlag:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, request_file: Optional[Path] = None) -> None:
        self.signum: Optional[int] = None
        self.request_file = Path(request_file) if request_file is not None else None
        self.installed = False
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption: cannot install SIGUSR1/SIGTERM handlers: training runs in thread %r, not "
                        "the main thread (Python delivers signals only there; Ray Train runs the train function "
                        "in a worker thread). Signals to this process will not save a checkpoint; to preempt "
                        "cleanly, create the file %s (every rank polls it each step)",
                        threading.current_thread().name, self.request_file or "<run_dir>/PREEMPT")
            return self
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self.installed = True
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        self.signum = signum

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
        self.installed = False

    def requested(self) -> bool:
        """This rank's view: a signal arrived or the request file exists."""
        return self.signum is not None or (self.request_file is not None and self.request_file.exists())

    def agreed(self, layout) -> bool:
        """True on every rank when any rank got a signal or saw the request file (one tiny
        all-reduce, on the layout's device)."""
        return self._consumed(layout.agree(self.requested()))

    def ask(self, layout) -> Callable[[], bool]:
        """:meth:`agreed` in two halves: this rank's view is sampled and its all-reduce issued
        now; the returned function waits and answers. The trainer asks at the top of a step and
        reads the answer at the top of the next, so the tiny all-reduce runs during the step
        instead of stalling every step (with several ranks a request is acted on one step later)."""
        if layout.world_size == 1:  # nothing to agree with: read this rank's view when answering
            return lambda: self._consumed(self.requested())
        answer = layout.agree_later(self.requested())
        return lambda: self._consumed(answer())

    def _consumed(self, agreed: bool) -> bool:
        if agreed and self.request_file is not None:
            self.request_file.unlink(missing_ok=True)  # consumed: a requeued job must not stop at once
        return agreed
