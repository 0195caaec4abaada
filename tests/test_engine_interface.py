"""Engine selection and the Engine interface as the checkpoint manager uses it, in process (no
process group): the manager calls save_sharded/load_sharded only for engines that declare them,
and accepts another layout only from an engine that reshards."""
import json

import pytest
import torch
from torch import nn

from dist_llm.checkpoint.manager import CheckpointError, CheckpointManager
from dist_llm.config.schema import JobConfig
from dist_llm.parallel import build_engine, engine_class
from dist_llm.parallel.deepspeed_engine import DeepSpeedEngine
from dist_llm.parallel.engine import Engine, StepStats
from dist_llm.parallel.megatron.pipeline_engine import MegatronPipelineEngine
from dist_llm.parallel.megatron.zero_engine import MegatronDeepSpeedEngine


def _cfg(engine: str, pp: int = 1) -> JobConfig:
    cfg = JobConfig()
    cfg.parallel.engine = engine
    cfg.parallel.pp = pp
    return cfg


@pytest.mark.parametrize("engine,pp,cls", [("deepspeed", 1, DeepSpeedEngine), ("megatron", 1, MegatronDeepSpeedEngine),
                                           ("megatron", 2, MegatronPipelineEngine),
                                           ("megatron", 4, MegatronPipelineEngine)])
def test_engine_class_by_config(engine, pp, cls):
    assert engine_class(_cfg(engine, pp)) is cls
    assert issubclass(cls, Engine)


def test_unknown_engine_is_a_clear_error():
    with pytest.raises(ValueError, match="parallel.engine='fsdp' is not available"):
        build_engine(_cfg("fsdp"), nn.Linear(2, 2), layout=None)


def test_megatron_engines_refuse_the_other_schedule_before_any_process_group():
    with pytest.raises(ValueError, match="needs parallel.pp=1"):
        MegatronDeepSpeedEngine(_cfg("megatron", 2), nn.Linear(2, 2), layout=None)
    with pytest.raises(ValueError, match="needs parallel.pp >= 2"):
        MegatronPipelineEngine(_cfg("megatron", 1), nn.Linear(2, 2), layout=None)


def test_sharded_checkpoint_declarations():
    assert not DeepSpeedEngine.supports_sharded and not DeepSpeedEngine.reshardable
    ds = object.__new__(DeepSpeedEngine)
    assert ds.checkpoint_name == "DeepSpeedEngine"
    with pytest.raises(NotImplementedError, match="supports_sharded is False"):
        ds.save_sharded("x")
    with pytest.raises(NotImplementedError, match="supports_sharded is False"):
        ds.load_sharded("x")
    # Both Megatron schedules write the same sharded format under one manifest name, so a
    # checkpoint moves between pp = 1 and pp > 1 (and old checkpoints keep loading).
    for cls in (MegatronDeepSpeedEngine, MegatronPipelineEngine):
        assert cls.supports_sharded and cls.reshardable
        assert object.__new__(cls).checkpoint_name == "MegatronEngine"


class _Layout:
    rank, dp, local_rank = 0, 1, 0

    def __init__(self, world_size: int = 1):
        self.world_size = world_size

    def barrier(self):
        pass


class _LinearEngine(Engine):
    """A real (single-process) engine: a linear model trained by torch AdamW."""

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.model = nn.Linear(4, 3)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.sharded_calls = []

    def train_step(self, micro_batches, lr):
        self.opt.zero_grad()
        loss = sum(self.model(mb).pow(2).mean() for mb in micro_batches)
        loss.backward()
        self.opt.step()
        return StepStats(loss=float(loss.detach()), grad_norm=float("nan"))

    def model_state_dict(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_model_state_dict(self, state):
        self.model.load_state_dict(state)

    def optimizer_state(self):
        return self.opt.state_dict()

    def load_optimizer_state(self, state):
        self.opt.load_state_dict(state)


class _ShardedLinearEngine(_LinearEngine):
    supports_sharded = True
    reshardable = True

    def save_sharded(self, directory):
        directory.mkdir()
        torch.save(self.model_state_dict(), directory / "weights.pt")
        self.sharded_calls.append(("save", directory.name))

    def load_sharded(self, directory):
        self.load_model_state_dict(torch.load(directory / "weights.pt", weights_only=True))
        self.sharded_calls.append(("load", directory.name))


def _save(tmp_path, engine, world_size=1):
    engine.train_step([torch.ones(2, 4)], lr=0.1)
    mgr = CheckpointManager(tmp_path, _Layout(world_size), keep_last=2)
    return mgr.save(3, engine, {"step": 3}, {"lane": 0}, config={})


@pytest.mark.parametrize("cls", [_LinearEngine, _ShardedLinearEngine])
def test_manager_calls_sharded_methods_only_when_declared(tmp_path, cls):
    src = cls(seed=0)
    path = _save(tmp_path, src)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["engine"] == cls.__name__
    assert (path / "sharded").is_dir() == cls.supports_sharded
    assert src.sharded_calls == ([("save", "sharded")] if cls.supports_sharded else [])
    dst = cls(seed=1)
    assert not torch.equal(dst.model.weight, src.model.weight)
    trainer, loader = CheckpointManager(tmp_path, _Layout(), keep_last=2).load(path, dst)
    assert trainer == {"step": 3} and loader == {"lane": 0}
    assert torch.equal(dst.model.weight, src.model.weight)
    assert dst.sharded_calls == ([("load", "sharded")] if cls.supports_sharded else [])
    exp_avg = lambda e: e.opt.state_dict()["state"][0]["exp_avg"]  # noqa: E731
    assert torch.equal(exp_avg(dst), exp_avg(src))  # same layout, same engine: optimizer restored


def test_other_world_size_needs_a_reshardable_engine(tmp_path):
    path = _save(tmp_path / "a", _LinearEngine(seed=0), world_size=2)
    with pytest.raises(CheckpointError, match="saved by 2 ranks"):
        CheckpointManager(tmp_path / "a", _Layout(), keep_last=2).load(path, _LinearEngine(seed=1))
    src = _ShardedLinearEngine(seed=0)
    path = _save(tmp_path / "b", src, world_size=2)
    dst = _ShardedLinearEngine(seed=1)
    CheckpointManager(tmp_path / "b", _Layout(), keep_last=2).load(path, dst)
    assert dst.sharded_calls == [("load", "sharded")]
    assert torch.equal(dst.model.weight, src.model.weight)
