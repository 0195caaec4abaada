"""The DeepSpeed engine withholds a step's update in one process (world size 1, real gloo group,
real DeepSpeed ZeRO 0/1/2; no lock needed): with the gate closed, or a NaN in the loss, or a NaN
in one gradient, no parameter and no optimizer tensor changes, the StepStats say so, and the next
step trains normally (DeepSpeed's micro-step bookkeeping stayed consistent)."""
from __future__ import annotations

import math
import multiprocessing
import os
import socket

import pytest
import torch

from dist_llm.config.store import compose
from dist_llm.launch.env import LaunchEnv
from dist_llm.parallel.engine import StepGate, StepHooks

pytestmark = pytest.mark.slow  # DeepSpeed start-up in a child process per stage


class Closed(StepGate):
    def allow(self, loss, finite):
        return False


class NanLoss(StepHooks):
    def before_backward(self, loss, last):
        return loss * float("nan") if last else loss


class NanGrad(StepHooks):
    def __init__(self, param):
        self.param, self.handle = param, None

    def before_backward(self, loss, last):
        if last:
            self.handle = self.param.register_hook(lambda g: torch.full_like(g, float("nan")))
        return loss

    def after_backward(self, last):
        if self.handle is not None:
            self.handle.remove()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj.detach().clone()]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _snapshot(engine):
    return [p.detach().clone() for p in engine.engine.module.parameters()], _tensors(engine.optimizer.state_dict())


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_withheld_update_changes_nothing_and_training_goes_on(stage):
    # One fresh process per stage: DeepSpeed caches process groups across re-initialisations.
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_check_stage, args=(stage,))
    p.start()
    p.join(300)
    assert p.exitcode == 0, f"ZeRO-{stage}: the check failed in the child (its traceback is above)"


def _check_stage(stage: int) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from dist_llm.models import build_model
    from dist_llm.parallel import build_engine
    from dist_llm.parallel.layout import init_layout, shutdown

    cfg = compose(["model=tiny", f"parallel=zero{stage}", "parallel.device=cpu", "train.micro_batch_size=2",
                   "train.global_batch_size=4"])
    le = LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                   master_addr="127.0.0.1", master_port=_port(), launcher="single")
    layout = init_layout(cfg.parallel, le)
    try:
        torch.manual_seed(0)
        engine = build_engine(cfg, build_model(cfg.model), layout)
        gen = torch.Generator().manual_seed(1)

        def batches():
            return [torch.randint(0, cfg.model.vocab_size, (2, 17), generator=gen) for _ in range(2)]

        assert engine.train_step(batches(), 1e-3).applied  # moments exist from here on
        cases = [("closed gate", Closed(), []), ("nan loss", StepGate(), [NanLoss()]),
                 ("nan grad", StepGate(), [NanGrad(next(engine.engine.module.parameters()))])]
        for what, gate, hooks in cases:
            engine.step_gate, engine.step_hooks = gate, hooks
            before = _snapshot(engine)
            stats = engine.train_step(batches(), 1e-3)
            after = _snapshot(engine)
            assert not stats.applied, what
            assert stats.finite == (what == "closed gate"), what
            assert _same(before[0], after[0]) and _same(before[1], after[1]), what
        engine.step_gate, engine.step_hooks = StepGate(), []
        before = _snapshot(engine)
        stats = engine.train_step(batches(), 1e-3)
        assert stats.applied and math.isfinite(stats.loss)
        assert not _same(before[0], _snapshot(engine)[0])  # a normal step updates again
    finally:
        shutdown()


def test_pipeline_engine_withholds_the_update_on_every_stage(tmp_path):
    """MegatronPipelineEngine (pp=2, 2 gloo ranks): a closed gate, or a NaN gradient on one stage
    only, withholds the update on both stages (the gate decides on the global norm); nothing
    changes, and the next step trains on both. Run under the shared lock."""
    import json
    from pathlib import Path

    from dist_llm.launch.local import spawn_local

    worker = Path(__file__).with_name("step_gate_pipeline_worker.py")
    env = {"DS_ACCELERATOR": "cpu", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    assert spawn_local(2, [str(worker), str(tmp_path)], extra_env=env) == 0
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert seen["first_applied"], rank
        for case in ("closed gate", "nan grad on stage 0", "nan grad on stage 1"):
            got = seen[case]
            assert not got["applied"] and got["unchanged"] and got["loss_finite"], (rank, case, got)
            assert got["finite"] == (case == "closed gate"), (rank, case, got)
        assert seen["after"]["applied"] and seen["after"]["params_changed"], (rank, seen["after"])
        assert seen["after"]["step_count"] == [1, 2], (rank, seen["after"])
