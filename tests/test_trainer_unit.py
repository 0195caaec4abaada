"""The Trainer in-process, fast: a small real model and torch.optim behind the Engine interface,
a world-1 ParallelLayout (no process group: its collectives are no-ops at world 1), real shards
read by the real TrainLoader, the real CheckpointManager, JSONL logger and callbacks."""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_llm.checkpoint.manager import CheckpointManager, SaveStage
from dist_llm.config.plan import make_plan
from dist_llm.config.schema import DatasetSource, DebugConfig, JobConfig
from dist_llm.config.store import config_to_dict
from dist_llm.data import ShardWriter, TrainLoader, ValLoader
from dist_llm.launch.env import EXIT_PREEMPTED
from dist_llm.observability import build_logger
from dist_llm.observability.progress import NullProgress
from dist_llm.parallel.engine import Engine, StepStats
from dist_llm.parallel.layout import ParallelLayout
from dist_llm.train.callbacks import Callback, CheckpointCallback, EvalLogCallback, MetricsCallback
from dist_llm.train.debug import FaultInjectionCallback, debug_callbacks
from dist_llm.train.schedule import lr_at
from dist_llm.train.trainer import NonFiniteLossError, Preempted, Trainer
from dist_llm.parallel.engine import Engine

SEQ, VOCAB = 8, 32


class FakeEngine(Engine):
    """The Engine interface over a tiny bigram model and torch's AdamW (one process, no DeepSpeed)."""

    def __init__(self, seed: int = 0, nan_at_step: int = -1):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.nan_at_step = nan_at_step
        self.lrs: List[float] = []
        self.batches: List[torch.Tensor] = []

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self.model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    def train_step(self, micro_batches: List[torch.Tensor], lr: float) -> StepStats:
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad()
        total = 0.0
        for b in micro_batches:
            loss = self._loss(b) / len(micro_batches)
            loss.backward()
            total += loss.item()
        norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), 1.0))
        self.opt.step()
        self.lrs.append(lr)
        self.batches.append(torch.cat(micro_batches))
        return StepStats(math.nan if len(self.lrs) == self.nan_at_step else total, norm)

    @torch.no_grad()
    def eval_loss(self, micro_batches: List[torch.Tensor]) -> float:
        return float(sum(self._loss(b).item() for b in micro_batches) / len(micro_batches))

    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_model_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def optimizer_state(self):
        return self.opt.state_dict()

    def load_optimizer_state(self, state) -> None:
        self.opt.load_state_dict(state)


def world1_layout() -> ParallelLayout:
    return ParallelLayout(rank=0, world_size=1, local_rank=0, dp=1, tp=1, pp=1, device=torch.device("cpu"),
                          backend="gloo")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Dict[str, str]:
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", 160), ("val", 24)):
        with ShardWriter(root / split, SEQ, VOCAB, samples_per_shard=16) as w:
            for _ in range(n):
                w.add(rng.integers(0, VOCAB, SEQ + 1))
        out[split] = str(root / split)
    return out


class Recorder(Callback):
    """Records every hook call (name, event, step) into a shared list."""

    def __init__(self, name: str, events: list):
        self.name, self.events = name, events

    def on_train_start(self, trainer):
        self.events.append((self.name, "start", trainer.state.step))

    def on_step_end(self, trainer, stats, step_time_s):
        self.events.append((self.name, "step", trainer.state.step))

    def on_eval(self, trainer, val_loss):
        self.events.append((self.name, "eval", trainer.state.step))

    def on_train_end(self, trainer):
        self.events.append((self.name, "end", trainer.state.step))


class StageRecorder:
    """A checkpoint-manager hook that records the stages a save passes, with what is on disk."""

    def __init__(self, root: Path):
        self.root, self.seen = root, []

    def on_stage(self, stage: SaveStage, step: int) -> None:
        name = f"step-{step:08d}"
        latest = (self.root / "latest").read_text().strip() if (self.root / "latest").exists() else None
        self.seen.append((stage, step, (self.root / f"{name}.tmp" / "manifest.json").exists(),
                          (self.root / name).exists(), latest))


class Crash(Exception):
    pass


class CrashAfter(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, stats, step_time_s):
        if trainer.state.step == self.step:
            raise Crash()


def make_trainer(run_dir: Path, shards, engine=None, extra=(), requeue=None, hooks=(), **train):
    cfg = JobConfig()
    cfg.name, cfg.output_dir = run_dir.name, str(run_dir.parent)
    cfg.data.train, cfg.data.val, cfg.data.lanes = [DatasetSource(shards["train"], 1.0)], shards["val"], 2
    cfg.model.vocab_size, cfg.train.seq_len = VOCAB, SEQ
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 2, 4
    cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.min_lr = 2, 1e-2, 1e-3
    for key, value in train.items():
        section, _, field = key.rpartition("__")
        setattr(getattr(cfg.train, section) if section else cfg.train, field, value)
    layout, tr = world1_layout(), cfg.train
    plan = make_plan(cfg, 1)
    assert plan.run_dir == run_dir and plan.grad_accum == 2
    loader = TrainLoader.from_config(cfg.data, tr, 0, 1, plan.grad_accum)
    val = ValLoader(shards["val"], SEQ, 0, 1, tr.micro_batch_size, tr.eval_batches * tr.global_batch_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = build_logger(cfg.logging.__class__(backend="none"), str(run_dir), run_dir.name, {}, True)
    callbacks = [MetricsCallback(1.0, 0.0, 1), EvalLogCallback(),
                 CheckpointCallback(tr.checkpoint.every, tr.checkpoint.keep_best), *extra]
    ckpt = CheckpointManager(run_dir, layout, tr.checkpoint.keep_last, hooks=hooks)
    return Trainer(cfg, layout, engine or FakeEngine(), loader, val, ckpt, logger, callbacks, NullProgress(),
                   config_to_dict(cfg), plan, requeue=requeue)


def steps_logged(run_dir: Path) -> List[int]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs if "train/loss" in r]


def test_loop_runs_max_steps_with_the_lr_schedule(tmp_path, shards):
    t = make_trainer(tmp_path / "run", shards, max_steps=7, checkpoint__save_at_end=False)
    summary = t.fit()
    eng = t.engine
    assert summary["step"] == 7 and t.state.tokens_seen == 7 * 4 * SEQ == 7 * t.plan.tokens_per_step
    assert eng.lrs == [lr_at(s, t.cfg.optim, 7) for s in range(7)]
    assert eng.lrs[0] < eng.lrs[1] == pytest.approx(1e-2) and eng.lrs[-1] < eng.lrs[2]  # warmup, then decay
    assert all(b.shape == (4, SEQ + 1) for b in eng.batches)  # grad_accum 2 x micro 2
    assert steps_logged(tmp_path / "run") == list(range(1, 8))
    assert not (tmp_path / "run" / "checkpoints").exists()  # save_at_end=false, no periodic saves


def test_eval_cadence(tmp_path, shards):
    events: list = []
    t = make_trainer(tmp_path / "run", shards, extra=[Recorder("r", events)], max_steps=7, eval_every=3,
                     checkpoint__save_at_end=False)
    t.fit()
    assert [s for _, e, s in events if e == "eval"] == [0, 3, 6, 7]  # baseline, every 3, and the last step
    assert math.isfinite(t.state.first_val_loss) and t.state.best_step in (3, 6, 7)
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()  # keep_best


def test_checkpoint_cadence_keep_last_and_save_stages(tmp_path, shards):
    run = tmp_path / "run"
    stages = StageRecorder(run / "checkpoints")
    t = make_trainer(run, shards, hooks=[stages], max_steps=7, checkpoint__every=2, checkpoint__keep_last=2)
    t.fit()
    saved = [s for stage, s, *_ in stages.seen if stage == SaveStage.after_all_files]
    assert saved == [2, 4, 6, 7]  # every 2 steps, plus the end
    assert [p.name for p in t.ckpt.committed()] == ["step-00000006", "step-00000007"]
    assert t.ckpt.latest().name == "step-00000007"
    manifest = json.loads((t.ckpt.latest() / "manifest.json").read_text())
    assert manifest["config"]["parallel"]["precision"] == "fp32" and manifest["config"]["train"]["checkpoint"]["every"] == 2
    # The stages of the save of step 4, in order, with what each one sees on disk.
    at4 = [(st, tmp_manifest, final, latest) for st, s, tmp_manifest, final, latest in stages.seen if s == 4]
    assert at4 == [(SaveStage.after_rank_files, False, False, "step-00000002"),
                   (SaveStage.after_all_files, False, False, "step-00000002"),
                   (SaveStage.after_manifest, True, False, "step-00000002"),
                   (SaveStage.before_latest, False, True, "step-00000002")]


def test_resume_continues_at_the_saved_step_with_the_same_loader_state(tmp_path, shards):
    full = make_trainer(tmp_path / "full", shards, max_steps=8)
    full.fit()
    first = make_trainer(tmp_path / "res", shards, extra=[CrashAfter(4)], max_steps=8, checkpoint__every=4)
    with pytest.raises(Crash):
        first.fit()
    loader_at_4 = first.train_loader.state_dict()
    second = make_trainer(tmp_path / "res", shards, engine=FakeEngine(seed=99), max_steps=8)
    second.maybe_resume()
    assert second.state.step == 4 and second.state.tokens_seen == 4 * second.plan.tokens_per_step
    assert second.train_loader.state_dict() == loader_at_4
    second.fit()
    assert second.engine.lrs == full.engine.lrs[4:]
    for a, b in zip(full.engine.batches[4:], second.engine.batches):
        assert torch.equal(a, b)
    wa, wb = full.engine.model_state_dict(), second.engine.model_state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_preemption_signal_saves_requeues_and_exits_with_the_preempted_code(tmp_path, shards):
    class SignalAt(Callback):
        def on_step_end(self, trainer, stats, step_time_s):
            if trainer.state.step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)  # a real signal: only the flag is set

    before = signal.getsignal(signal.SIGUSR1)
    requeued: list = []
    t = make_trainer(tmp_path / "run", shards, extra=[SignalAt()], requeue=lambda: requeued.append(1), max_steps=10)
    with pytest.raises(Preempted) as e:
        t.fit()
    assert e.value.code == EXIT_PREEMPTED and requeued == [1]
    assert t.state.step == 3 and t.ckpt.latest().name == "step-00000003"
    assert signal.getsignal(signal.SIGUSR1) is before  # handler uninstalled


def test_non_finite_loss_raises_and_leaves_the_checkpoint_intact(tmp_path, shards):
    t = make_trainer(tmp_path / "run", shards, engine=FakeEngine(nan_at_step=5), max_steps=10, checkpoint__every=2)
    with pytest.raises(NonFiniteLossError, match="step 5.*intact"):
        t.fit()
    latest = t.ckpt.latest()
    assert latest.name == "step-00000004" and not list(t.ckpt.root.glob("*.tmp"))
    state, _ = t.ckpt.load(latest, FakeEngine(seed=3))  # verifies every sha256 in the manifest
    assert state["step"] == 4


def test_callbacks_run_in_order(tmp_path, shards):
    events: list = []
    run = tmp_path / "run"

    class SeesCheckpoint(Recorder):
        def on_step_end(self, trainer, stats, step_time_s):
            super().on_step_end(trainer, stats, step_time_s)
            if trainer.state.step == 2:  # the CheckpointCallback before it already committed step 2
                assert (run / "checkpoints" / "step-00000002" / "manifest.json").is_file()

    t = make_trainer(run, shards, extra=[SeesCheckpoint("a", events), Recorder("b", events)], max_steps=4,
                     eval_every=2, checkpoint__every=2)
    t.fit()
    assert events == [("a", "start", 0), ("b", "start", 0), ("a", "eval", 0), ("b", "eval", 0),
                      ("a", "step", 1), ("b", "step", 1), ("a", "step", 2), ("b", "step", 2),
                      ("a", "eval", 2), ("b", "eval", 2), ("a", "step", 3), ("b", "step", 3),
                      ("a", "step", 4), ("b", "step", 4), ("a", "eval", 4), ("b", "eval", 4),
                      ("a", "end", 4), ("b", "end", 4)]


def test_fault_injection_is_opt_in_and_fires_once_per_run_dir(tmp_path, shards):
    assert debug_callbacks(DebugConfig()) == []
    cfg = DebugConfig(crash_at_step=99, crash_point="after_rank_files")  # beyond max_steps: never fires
    run = tmp_path / "run"
    first = FaultInjectionCallback(cfg)
    t = make_trainer(run, shards, extra=[first], max_steps=2)
    t.fit()
    assert first.armed and first in t.ckpt.hooks and (run / ".fault-at-99").is_file()
    again = FaultInjectionCallback(cfg)
    make_trainer(run, shards, extra=[again], max_steps=3).fit()  # a restarted job: disarmed
    assert not again.armed
    other_rank = FaultInjectionCallback(DebugConfig(crash_at_step=99, crash_rank=1))
    make_trainer(tmp_path / "other", shards, extra=[other_rank], max_steps=1).fit()
    assert not other_rank.armed


# --- step-time breakdown and the profiler window ---
class PhasedFakeEngine(FakeEngine):
    """FakeEngine that reports its phases through the real PhaseClock, like the DeepSpeed engines."""

    def train_step(self, micro_batches, lr):
        from dist_llm.parallel.engine import PhaseClock

        clock = PhaseClock()
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad()
        total = torch.zeros(())
        for b in micro_batches:
            loss = self._loss(b) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        clock.mark("fwd_bwd_s")
        self.opt.step()
        clock.mark("optim_s")
        loss = float(total)
        clock.mark("comm_s")
        return StepStats(loss, math.nan, timings=clock.times)


def test_metrics_log_the_step_time_breakdown(tmp_path, shards):
    t = make_trainer(tmp_path / "run", shards, engine=PhasedFakeEngine(), max_steps=4, log_every=1,
                     checkpoint__save_at_end=False)
    t.fit()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "train/loss" in r]
    assert len(steps) == 4
    for r in steps:
        for k in ("time/data_s", "time/fwd_bwd_s", "time/optim_s", "time/comm_s"):
            assert k in r and r[k] >= 0.0, (k, r)
        assert r["time/fwd_bwd_s"] > 0 and r["time/data_s"] > 0
    # first step (the throughput window holds only it): the engine's phases partition its own
    # step time, so they add up to at most what the trainer timed around train_step
    first = steps[0]
    assert first["time/fwd_bwd_s"] + first["time/optim_s"] + first["time/comm_s"] <= first["step_time_s"] + 1e-6


def test_profile_window_writes_a_chrome_trace_on_the_chosen_rank(tmp_path, shards):
    from dist_llm.train.profiling import ProfilerCallback

    run_dir = tmp_path / "run"
    prof = ProfilerCallback("2:2", [0], 0, run_dir)
    other = ProfilerCallback("2:2", [1], 0, run_dir / "other")  # rank 0 is not chosen there
    events: list = []
    t = make_trainer(run_dir, shards, max_steps=6, checkpoint__save_at_end=False,
                     extra=[prof, other, Recorder("r", events)])
    t.fit()
    trace = json.loads((run_dir / "profile" / "rank0.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names), "the trace records the step's ops"
    assert any("AdamW" in n or "Optimizer.step" in n for n in names), "the optimizer step is in the window"
    assert not (run_dir / "other" / "profile").exists()


@pytest.mark.parametrize("spec", ["3", "a:b", "-1:2", "2:0", "1:2:3"])
def test_bad_profile_window_is_a_config_error(spec):
    from dist_llm.config.validate import _loop_problems

    cfg = JobConfig()
    cfg.train.profile = spec
    problems = _loop_problems(cfg)
    assert len(problems) == 1 and "train.profile" in problems[0] and "<start>:<steps>" in problems[0]
    cfg.train.profile = "10:5"
    assert _loop_problems(cfg) == []
