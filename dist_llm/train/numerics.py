"""Numerical faults: the step gate the engines consult before every optimizer step.

The engine all-reduces the loss and a "some gradient is non-finite" flag once, so every rank
hands :meth:`NumericsGate.allow` the same numbers and decides alike. A withheld update changes
neither parameters nor optimizer state; the trainer then applies the policy
(``train.nonfinite`` / ``train.spike.policy``): ``raise`` stops the run (nothing of the poisoned
step is saved), ``skip`` counts the step in ``TrainState.skipped_steps`` and goes on (the step
number, the learning-rate schedule and the loader advance as for any step).
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from typing import List, Optional

from dist_llm.config.schema import TrainConfig
from dist_llm.parallel.engine import StepGate


class NonFiniteLossError(RuntimeError):
    pass


class NumericsGate(StepGate):
    def __init__(self, tr: TrainConfig):
        self.nonfinite_policy = str(tr.nonfinite)
        self.spike = tr.spike
        self.history: deque = deque(maxlen=max(tr.spike.window, 1))  # losses of applied steps
        self.reason: Optional[str] = None  # why the last update was withheld

    def allow(self, loss: float, finite: bool) -> bool:
        self.reason = None
        if not finite:
            self.reason = f"non-finite loss or gradient (loss {loss})"
            return False
        if self.spike.factor and len(self.history) >= self.history.maxlen:
            median = statistics.median(self.history)
            if loss > self.spike.factor * median:
                self.reason = (f"loss spike: {loss:.4g} > train.spike.factor={self.spike.factor} x median "
                               f"{median:.4g} of the last {len(self.history)} steps")
                return False
        self.history.append(loss)
        return True

    def policy(self, finite: bool) -> str:
        """The policy for the last withheld step (an engine's own overflow check gives no reason)."""
        return self.nonfinite_policy if not finite or self.reason is None or "spike" not in self.reason \
            else str(self.spike.policy)

    # --- resume: the spike window is part of the trainer state ---
    def state(self) -> List[float]:
        return [x for x in self.history if math.isfinite(x)]

    def load_state(self, losses: Optional[List[float]]) -> None:
        self.history.clear()
        self.history.extend(losses or [])
