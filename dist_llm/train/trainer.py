"""The training loop: small on purpose. Everything optional is a callback."""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from dist_llm.checkpoint.manager import CheckpointManager
from dist_llm.config.plan import RunPlan
from dist_llm.config.schema import JobConfig
from dist_llm.launch.env import EXIT_PREEMPTED
from dist_llm.parallel.engine import StepHooks
from dist_llm.train.callbacks import Callback, StepTimer
from dist_llm.train.numerics import NonFiniteLossError, NumericsGate
from dist_llm.train.preempt import PREEMPT_FILE, PreemptionFlag
from dist_llm.train.schedule import lr_at

log = logging.getLogger("dist_llm.train")


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is committed; exits with EXIT_PREEMPTED."""

    def __init__(self) -> None:
        super().__init__(EXIT_PREEMPTED)


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    best_step: int = -1
    last_val_loss: float = math.nan
    first_val_loss: float = math.nan  # at step 0, before any update: the baseline of the run
    skipped_steps: int = 0  # updates withheld under train.nonfinite/spike.policy=skip
    recent_losses: Optional[List[float]] = None  # the loss-spike window (restored on resume)


class Trainer:
    def __init__(self, cfg: JobConfig, layout, engine, train_loader, val_loader, ckpt: CheckpointManager,
                 logger, callbacks: List[Callback], progress, config_dict: Dict[str, Any],
                 plan: RunPlan, requeue=None):
        self.cfg, self.layout, self.engine, self.plan = cfg, layout, engine, plan
        self.train_loader, self.val_loader, self.ckpt = train_loader, val_loader, ckpt
        self.logger, self.callbacks, self.progress = logger, callbacks, progress
        self.config_dict = config_dict
        self.requeue = requeue  # called on rank 0 after a preemption save (Slurm requeue)
        self.state = TrainState()
        self.last_lr = 0.0
        self.preempt = PreemptionFlag(ckpt.run_dir / PREEMPT_FILE)  # the file: preemption off the main thread
        self._saved_at = -1
        self.resumed_from: Optional[Path] = None  # the checkpoint maybe_resume loaded
        self.ending: Optional[str] = None  # "preempted" while the preemption checkpoint is saved
        self.gate = NumericsGate(cfg.train)
        engine.step_gate = self.gate
        self.step_hooks = [cb for cb in callbacks if isinstance(cb, StepHooks)]
        engine.step_hooks = self.step_hooks

    # --- state ---
    def _trainer_state(self) -> Dict[str, Any]:
        self.state.recent_losses = self.gate.state()
        d = asdict(self.state)
        for k in ("best_val_loss", "last_val_loss", "first_val_loss"):  # JSON has no inf/nan
            d[k] = d[k] if math.isfinite(d[k]) else None
        d["world_size"] = self.layout.world_size
        return d

    def save_checkpoint(self) -> Optional[Path]:
        if self._saved_at == self.state.step:
            return None
        extra: Dict[str, Any] = {}
        for cb in self.callbacks:  # e.g. provenance: which attempt trained which steps
            extra.update(getattr(cb, "manifest_entries", lambda _: {})(self))
        path = self.ckpt.save(self.state.step, self.engine, self._trainer_state(),
                              self.train_loader.state_dict(), self.config_dict, extra_manifest=extra)
        self._saved_at = self.state.step
        log.info("checkpoint committed: %s", path)
        return path

    def maybe_resume(self) -> None:
        self.ckpt.remove_stale()
        ck = self.cfg.train.checkpoint
        path = self.ckpt.resolve_verified(ck.resume, self.engine, fallback=ck.resume_fallback,
                                          config=self.config_dict)
        if path is None:
            return
        trainer_state, loader_state = self.ckpt.load(path, self.engine)
        self.train_loader.load_state_dict(loader_state)
        for k, v in trainer_state.items():
            if hasattr(self.state, k):
                setattr(self.state, k, v if v is not None else getattr(TrainState(), k))
        self.gate.load_state(self.state.recent_losses)
        self._saved_at = self.state.step
        self.resumed_from = path
        log.info("resumed from %s at step %d", path, self.state.step)

    # --- loop ---
    def evaluate(self) -> float:
        loss = self.engine.eval_loss(self.val_loader.batches())
        self.state.last_val_loss = loss
        if self.state.step == 0:
            self.state.first_val_loss = loss
        for cb in self.callbacks:
            cb.on_eval(self, loss)
        return loss

    def _on_preempt(self) -> None:
        log.warning("preemption signal received: saving a checkpoint at step %d", self.state.step)
        self.ending = "preempted"
        self.save_checkpoint()
        self.logger.finish(exit_code=EXIT_PREEMPTED)
        if self.layout.rank == 0 and self.requeue is not None:
            self.requeue()
        raise Preempted()

    def _on_withheld_update(self, stats) -> None:
        """The engine withheld this step's update on every rank (they agreed before stepping)."""
        step = self.state.step + 1
        reason = self.gate.reason or "non-finite gradients (the optimizer's overflow check)"
        if self.gate.policy(stats.finite) == "raise":
            raise NonFiniteLossError(
                f"step {step}: {reason}; the update was not applied and nothing of it is saved (parameters "
                f"are those of step {step - 1}; the last committed checkpoint in {self.ckpt.root} is intact). "
                f"Lower optim.lr, raise optim.warmup_steps or use parallel.precision=fp32; "
                f"train.nonfinite=skip / train.spike.policy=skip skips such steps instead")
        self.state.skipped_steps += 1
        log.warning("step %d: %s: update skipped on every rank (%d skipped so far)", step, reason,
                    self.state.skipped_steps)

    def fit(self) -> Dict[str, Any]:
        cfg, tr = self.cfg, self.cfg.train
        self.preempt.install()
        try:
            self.maybe_resume()
            for cb in self.callbacks:
                cb.on_train_start(self)
            if tr.eval_every and self.val_loader is not None and self.state.step == 0:
                self.evaluate()
            timer = StepTimer()
            preempt_answer = self.preempt.ask(self.layout)
            while self.state.step < tr.max_steps:
                for h in self.step_hooks:
                    h.phase("all_reduce:preemption flag")
                if preempt_answer():  # asked one step ago: its all-reduce ran during that step
                    self._on_preempt()
                preempt_answer = self.preempt.ask(self.layout)
                self.last_lr = lr_at(self.state.step, cfg.optim, tr.max_steps)
                for cb in self.callbacks:
                    cb.on_step_begin(self)
                timer.start()
                batches = self.train_loader.next_step()
                data_s = timer.stop()
                timer.start()
                stats = self.engine.train_step(batches, self.last_lr)
                elapsed = timer.stop()
                stats.timings["data_s"] = data_s
                if not stats.applied:
                    self._on_withheld_update(stats)
                elif not math.isfinite(stats.loss):  # an engine that does not consult the step gate
                    raise NonFiniteLossError(
                        f"loss is {stats.loss} at step {self.state.step + 1}: lower optim.lr, raise "
                        f"optim.warmup_steps or use parallel.precision=fp32; the last committed checkpoint "
                        f"in {self.ckpt.root} is intact")
                self.state.step += 1
                self.state.tokens_seen += self.plan.tokens_per_step
                for cb in self.callbacks:
                    cb.on_step_end(self, stats, elapsed)
                if tr.eval_every and self.val_loader is not None and self.state.step % tr.eval_every == 0:
                    self.evaluate()
            preempt_answer()  # the last question's all-reduce is waited for (the run is done: no requeue)
            if self.val_loader is not None and tr.eval_every and self.state.step % tr.eval_every:
                self.evaluate()
            if tr.checkpoint.save_at_end:
                self.save_checkpoint()
            for cb in self.callbacks:
                cb.on_train_end(self)
        except BaseException as exc:
            for cb in self.callbacks:
                cb.on_exception(self, exc)
            raise
        finally:
            self.preempt.uninstall()
            self.progress.close()
        return self.summary()

    def summary(self) -> Dict[str, Any]:
        st = self.state
        best_dir = self.ckpt.run_dir / "best"
        out = {"step": st.step, "tokens_seen": st.tokens_seen, "run_dir": str(self.ckpt.run_dir),
               "val_loss": st.last_val_loss if math.isfinite(st.last_val_loss) else None,
               "best_val_loss": st.best_val_loss if math.isfinite(st.best_val_loss) else None,
               "best_step": st.best_step,
               "first_val_loss": st.first_val_loss if math.isfinite(st.first_val_loss) else None,
               "best_checkpoint": str(best_dir) if best_dir.is_dir() else None}
        latest = self.ckpt.latest() if self.layout.rank == 0 else None
        out["latest_checkpoint"] = str(latest) if latest else None
        return out
