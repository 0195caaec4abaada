"""Fault injection for the restart tests: kill one rank at a chosen step and point.

Only added to a run when the ``debug`` config group arms it (``debug.crash_at_step >= 0``); the
trainer and the checkpoint manager know nothing of it. ``debug.crash_point=after_step`` exits the
rank with ``os._exit`` right after that optimizer step; a :class:`SaveStage` name sends the rank a
real SIGKILL when the save of that step passes the stage.

It fires once per run directory: at start-up every rank checks a marker file before the crash
rank writes it, so the restarted job (Ray restart, Slurm requeue, a rerun) trains through.
"""
from __future__ import annotations

import logging
import os
import signal

from dist_llm.checkpoint.manager import SaveStage
from dist_llm.config.schema import CrashPoint, DebugConfig
from dist_llm.train.callbacks import Callback

log = logging.getLogger("dist_llm.train")

EXIT_INJECTED_FAULT = 13


class FaultInjectionCallback(Callback):
    def __init__(self, cfg: DebugConfig):
        self.cfg = cfg
        self.armed = False
        self.rank = -1

    def on_train_start(self, trainer) -> None:
        marker = trainer.ckpt.run_dir / f".fault-at-{self.cfg.crash_at_step}"
        armed = not marker.exists()
        trainer.layout.barrier()  # every rank has read the marker before anyone writes it
        self.rank = trainer.layout.rank
        self.armed = armed and self.rank == self.cfg.crash_rank
        if self.armed:
            marker.touch()
            if self.cfg.crash_point != CrashPoint.after_step:
                trainer.ckpt.hooks.append(self)

    def on_step_end(self, trainer, stats, step_time_s) -> None:
        if (self.armed and self.cfg.crash_point == CrashPoint.after_step
                and trainer.state.step == self.cfg.crash_at_step):
            log.warning("fault injection: rank %d exits at step %d", self.rank, trainer.state.step)
            os._exit(EXIT_INJECTED_FAULT)

    def on_stage(self, stage: SaveStage, step: int) -> None:
        """A checkpoint-manager hook: SIGKILL this rank at the configured save stage."""
        if self.armed and step == self.cfg.crash_at_step and stage.value == self.cfg.crash_point:
            log.warning("fault injection: rank %d killed at %s of step %d", self.rank, stage.value, step)
            os.kill(os.getpid(), signal.SIGKILL)


def debug_callbacks(cfg: DebugConfig) -> list:
    """The callbacks the ``debug`` group asks for (none unless armed)."""
    return [FaultInjectionCallback(cfg)] if cfg.enabled else []
