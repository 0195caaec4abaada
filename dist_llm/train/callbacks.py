"""Trainer extensions. The loop calls these hooks; each callback does one job."""
from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Dict, Optional

from dist_llm.checkpoint import provenance
from dist_llm.observability import Throughput, memory_stats, mfu
from dist_llm.observability.redact import redact_text

if TYPE_CHECKING:  # pragma: no cover
    from dist_llm.parallel.engine import StepStats
    from dist_llm.train.trainer import Trainer

log = logging.getLogger("dist_llm.train")


class Callback:
    def on_train_start(self, trainer: "Trainer") -> None: ...
    def on_step_begin(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer", stats: "StepStats", step_time_s: float) -> None: ...
    def on_eval(self, trainer: "Trainer", val_loss: float) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...
    def on_exception(self, trainer: "Trainer", exc: BaseException) -> None:
        """``fit`` is leaving with ``exc`` (re-raised after every callback saw it)."""

    def manifest_entries(self, trainer: "Trainer") -> Dict[str, Any]:
        """Top-level entries for the manifest of the checkpoint being saved now (every rank is
        asked; rank 0's answer is written)."""
        return {}


class MetricsCallback(Callback):
    """Loss, LR, grad norm, throughput, MFU and memory every ``train.log_every`` steps."""

    def __init__(self, flops_per_token: float, peak_flops: float, n_devices: int):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.n_devices = n_devices
        self.throughput = Throughput()

    def on_step_end(self, trainer, stats, step_time_s):
        cfg = trainer.cfg.train
        rates = self.throughput.update(step_time_s, trainer.plan.tokens_per_step, cfg.global_batch_size)
        step = trainer.state.step
        trainer.progress.update(1)
        trainer.progress.set_postfix(loss=f"{stats.loss:.4f}")
        if step % cfg.log_every and step != cfg.max_steps:
            return
        metrics: Dict[str, float] = {
            "train/loss": stats.loss, "train/lr": trainer.last_lr, "train/grad_norm": stats.grad_norm,
            "train/tokens_seen": float(trainer.state.tokens_seen), **rates,
            **{f"train/{k}": v for k, v in getattr(stats, "metrics", {}).items()},
        }
        if self.peak_flops > 0 and rates.get("tokens_per_s"):
            metrics["perf/mfu"] = mfu(rates["tokens_per_s"], self.flops_per_token, self.n_devices, self.peak_flops)
        metrics.update({f"time/{k}": v for k, v in stats.timings.items()})
        metrics.update(memory_stats(trainer.layout.device))
        trainer.logger.log(metrics, step)


class EvalLogCallback(Callback):
    def on_eval(self, trainer, val_loss):
        extra = {f"val/{k}": v for k, v in trainer.engine.last_eval_metrics.items()}
        trainer.logger.log({"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50.0)), **extra},
                           trainer.state.step)


class CheckpointCallback(Callback):
    """Periodic saves, plus the weights of the best validation loss (model selection)."""

    def __init__(self, every: int, keep_best: bool):
        self.every = every
        self.keep_best = keep_best

    def on_step_end(self, trainer, stats, step_time_s):
        if self.every and trainer.state.step % self.every == 0:
            trainer.save_checkpoint()

    def on_eval(self, trainer, val_loss):
        st = trainer.state
        if val_loss < st.best_val_loss:
            st.best_val_loss, st.best_step = val_loss, st.step
            if self.keep_best and st.step > 0:
                trainer.ckpt.save_best(trainer.engine, st.step, val_loss)


class ProvenanceCallback(Callback):
    """Which attempt trained which steps, with its code, packages, config, data and allocation
    (dist_llm/checkpoint/provenance.py): ``<run_dir>/provenance.json`` and the ``provenance``
    entry of every checkpoint manifest. Rank 0 keeps the ledger; every rank joins the one
    gather of host names at the start."""

    def __init__(self, launch_env):
        self.launch_env = launch_env
        self.started_at = provenance.now_iso()
        self.ledger: Optional[provenance.Ledger] = None

    def on_train_start(self, trainer):
        hosts = trainer.layout.all_gather_object(provenance.local_hostname())
        if trainer.layout.rank != 0:
            return
        data = trainer.cfg.data
        record = provenance.attempt_record(trainer.config_dict, provenance.data_fingerprints(data.train, data.val),
                                           provenance.launch_record(self.launch_env, hosts))
        self.ledger = provenance.Ledger.start(trainer.ckpt.run_dir, record, trainer.config_dict,
                                              trainer.state.step, trainer.resumed_from, self.started_at)
        self.ledger.write()

    def manifest_entries(self, trainer):
        if self.ledger is None:
            return {}
        ended = trainer.ending or ("completed" if trainer.state.step >= trainer.cfg.train.max_steps else None)
        self.ledger.update(trainer.state.step, ended)
        self.ledger.write()
        return {"provenance": self.ledger.manifest_entry()}

    def on_train_end(self, trainer):
        if self.ledger is not None:
            self.ledger.update(trainer.state.step, "completed")
            self.ledger.write()

    def on_exception(self, trainer, exc):
        if self.ledger is not None:
            self.ledger.update(trainer.state.step, trainer.ending or "crashed")
            if not trainer.ending:
                self.ledger.current["error"] = redact_text(f"{type(exc).__name__}: {exc}")[:500]
            self.ledger.write()


class StepTimer:
    def __init__(self) -> None:
        self.t0: Optional[float] = None

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        assert self.t0 is not None
        return time.perf_counter() - self.t0
