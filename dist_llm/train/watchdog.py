"""Hang detection: a heartbeat per rank and a watchdog thread that ends a hung rank loudly.

The trainer's hooks beat at every phase of a step (backward, each all-reduce, the optimizer
step) and at every step end. If no beat comes for ``train.hang_timeout_s`` (before the first
step has finished: ``parallel.first_step_timeout_s``), the watchdog logs the rank, the step and
the phase (the collective it waits in), dumps the Python stack of every thread to stderr and
exits the process with :data:`EXIT_HANG` (``os._exit``: a thread blocked in a collective cannot
be interrupted), so the launcher tears the other ranks down. After the first step the
collective timeout drops from ``parallel.first_step_timeout_s`` to ``parallel.timeout_s``, so a
rank waiting on a dead peer fails by itself too; :meth:`WatchdogCallback.on_exception` then
names the phase it failed in.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from typing import Optional

from dist_llm.parallel.engine import StepHooks
from dist_llm.parallel.layout import set_collective_timeout
from dist_llm.train.callbacks import Callback

log = logging.getLogger("dist_llm.train")

EXIT_HANG = 14


class Watchdog:
    def __init__(self, rank: int, timeout_s: float, poll_s: float = 1.0):
        self.rank, self.timeout_s, self.poll_s = rank, timeout_s, poll_s
        self.step, self.phase = 0, "start"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dist-llm-watchdog", daemon=True)

    def start(self) -> None:
        self._last = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def beat(self, step: int, phase: str) -> None:
        self.step, self.phase, self._last = step, phase, time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            silent = time.monotonic() - self._last
            if silent > self.timeout_s:
                self._fire(silent)

    def _fire(self, silent: float) -> None:
        log.error("watchdog: rank %d hung at step %d in phase %s: no heartbeat for %.0f s "
                  "(train.hang_timeout_s=%s); stacks of all threads follow, exiting %d",
                  self.rank, self.step, self.phase, silent, self.timeout_s, EXIT_HANG)
        for h in logging.getLogger().handlers:
            h.flush()
        sys.stderr.write(f"--- rank {self.rank} step {self.step} phase {self.phase}: all threads ---\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_HANG)


class WatchdogCallback(Callback, StepHooks):
    """Beats from the trainer's callbacks and the engine's step hooks."""

    def __init__(self, hang_timeout_s: float, first_step_timeout_s: float, collective_timeout_s: float):
        self.hang_timeout_s = hang_timeout_s
        self.first_step_timeout_s = first_step_timeout_s
        self.collective_timeout_s = collective_timeout_s
        self.dog: Optional[Watchdog] = None
        self.step = 0  # the last finished step
        self.at = (0, "start")  # (step, phase) this rank is in
        self.first_done = False

    def on_train_start(self, trainer) -> None:
        self.step = trainer.state.step
        self.at = (self.step + 1, "first step")
        if self.hang_timeout_s > 0:
            self.dog = Watchdog(trainer.layout.rank, max(self.hang_timeout_s, self.first_step_timeout_s))
            self.dog.beat(*self.at)
            self.dog.start()

    def phase(self, name: str) -> None:
        self.at = (self.step + 1, name)  # the step being computed
        if self.dog is not None:
            self.dog.beat(*self.at)

    def on_step_end(self, trainer, stats, step_time_s) -> None:
        self.step = trainer.state.step
        self.at = (self.step, "after the step (callbacks: eval, checkpoint)")
        if self.dog is not None:
            self.dog.beat(*self.at)
        if not self.first_done:  # start-up is over: the short timeouts from now on
            self.first_done = True
            set_collective_timeout(self.collective_timeout_s)
            if self.dog is not None:
                self.dog.timeout_s = self.hang_timeout_s

    def on_exception(self, trainer, exc: BaseException) -> None:
        if self.dog is not None:
            self.dog.stop()
        if isinstance(exc, Exception):
            log.error("rank %d failed at step %d in phase %s: %s: %s", trainer.layout.rank, self.at[0],
                      self.at[1], type(exc).__name__, exc)

    def on_train_end(self, trainer) -> None:
        if self.dog is not None:
            self.dog.stop()
