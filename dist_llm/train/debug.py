"""Fault injection for the fault tests: kill a rank, hang it, poison its numbers.

Only added to a run when the ``debug`` config group arms it; the trainer, the engines and the
checkpoint manager know nothing of it (the engines call their generic step hooks, which this
callback implements).

* Crash (``debug.crash_at_step >= 0``): ``debug.crash_point=after_step`` exits the rank with
  ``os._exit`` right after that optimizer step; a :class:`SaveStage` name sends the rank a real
  SIGKILL when the save of that step passes the stage. It fires once per run directory: at
  start-up every rank checks a marker file before the crash rank writes it, so the restarted
  job (Ray restart, Slurm requeue, a rerun) trains through.
* Step faults on ``debug.fault_rank`` (-1 = all), each time the step is computed:
  ``sleep_at_step`` sleeps ``sleep_s`` before the first step phase named ``collective*``
  (a hang in front of an all-reduce); ``nan_at_step`` makes the last micro-batch's loss, or
  (``nan_in=grad``) one parameter's gradient, NaN (``inf=true``: +inf); ``spike_at_step``
  multiplies every micro-batch loss of that step by ``spike_factor``.
"""
from __future__ import annotations

import logging
import os
import signal
import time

import torch

from dist_llm.checkpoint.manager import SaveStage
from dist_llm.config.choices import CrashPoint, NanTarget
from dist_llm.config.schema import DebugConfig
from dist_llm.parallel.engine import StepHooks
from dist_llm.train.callbacks import Callback

log = logging.getLogger("dist_llm.train")

EXIT_INJECTED_FAULT = 13


class FaultInjectionCallback(Callback, StepHooks):
    def __init__(self, cfg: DebugConfig):
        self.cfg = cfg
        self.armed = False
        self.rank = -1
        self.step = 0  # the last finished step
        self.slept = False
        self._grad_hook = None

    def on_train_start(self, trainer) -> None:
        self.rank = trainer.layout.rank
        self.step = trainer.state.step
        if self.cfg.crash_at_step < 0:
            return
        marker = trainer.ckpt.run_dir / f".fault-at-{self.cfg.crash_at_step}"
        armed = not marker.exists()
        trainer.layout.barrier()  # every rank has read the marker before anyone writes it
        self.armed = armed and self.rank == self.cfg.crash_rank
        if self.armed:
            marker.touch()
            if self.cfg.crash_point != CrashPoint.after_step:
                trainer.ckpt.hooks.append(self)

    # --- step faults (engine step hooks) ---
    def _here(self, at_step: int) -> bool:
        return self.step + 1 == at_step and self.cfg.fault_rank in (-1, self.rank)

    def phase(self, name: str) -> None:
        if self._here(self.cfg.sleep_at_step) and name.startswith(self.cfg.collective) and not self.slept:
            self.slept = True
            log.warning("fault injection: rank %d sleeps %.0f s at step %d before %s", self.rank,
                        self.cfg.sleep_s, self.step + 1, name)
            time.sleep(self.cfg.sleep_s)

    def before_backward(self, loss: torch.Tensor, last: bool) -> torch.Tensor:
        cfg = self.cfg
        if self._here(cfg.spike_at_step):
            loss = loss * cfg.spike_factor
        if last and self._here(cfg.nan_at_step):
            bad = float("inf") if cfg.inf else float("nan")
            log.warning("fault injection: rank %d puts %s into the %s at step %d", self.rank, bad, cfg.nan_in,
                        self.step + 1)
            if cfg.nan_in == NanTarget.loss:
                return loss * bad
            leaf = _first_parameter(loss)
            self._grad_hook = leaf.register_hook(lambda g: torch.full_like(g, bad))
        return loss

    def after_backward(self, last: bool) -> None:
        if self._grad_hook is not None:
            self._grad_hook.remove()
            self._grad_hook = None

    def on_step_end(self, trainer, stats, step_time_s) -> None:
        self.step = trainer.state.step
        if (self.armed and self.cfg.crash_point == CrashPoint.after_step
                and trainer.state.step == self.cfg.crash_at_step):
            log.warning("fault injection: rank %d exits at step %d", self.rank, trainer.state.step)
            os._exit(EXIT_INJECTED_FAULT)

    def on_stage(self, stage: SaveStage, step: int) -> None:
        """A checkpoint-manager hook: SIGKILL this rank at the configured save stage."""
        if self.armed and step == self.cfg.crash_at_step and stage.value == self.cfg.crash_point:
            log.warning("fault injection: rank %d killed at %s of step %d", self.rank, stage.value, step)
            os.kill(os.getpid(), signal.SIGKILL)


def _first_parameter(loss: torch.Tensor) -> torch.Tensor:
    """A parameter the loss depends on (the first leaf of its autograd graph): the engine's own
    trained tensor, whatever wraps or shards the model."""
    todo, seen = [loss.grad_fn], set()
    while todo:
        fn = todo.pop(0)
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):  # AccumulateGrad: a leaf that requires grad
            return fn.variable
        todo.extend(f for f, _ in fn.next_functions)
    raise RuntimeError("fault injection: the loss depends on no parameter")


def debug_callbacks(cfg: DebugConfig) -> list:
    """The callbacks the ``debug`` group asks for (none unless armed)."""
    return [FaultInjectionCallback(cfg)] if cfg.enabled else []
