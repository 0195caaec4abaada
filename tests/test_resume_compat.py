"""Issue 9, Fix 9: a checkpoint of another model shape, precision or ZeRO stage is refused with a
message naming the field, before any engine call (real checkpoints written by the manager)."""
from __future__ import annotations

import copy
import enum

import pytest

from dist_llm.checkpoint.compat import resume_mismatches
from dist_llm.checkpoint.manager import CheckpointError, CheckpointManager
from test_faults_checkpoint_unit import ShardedEngine, TinyEngine, _Layout

CONFIG = {"name": "t", "model": {"preset": "gpt2", "n_layers": 2, "n_heads": 4, "n_kv_heads": None, "d_model": 64,
                                 "d_ff": None, "max_seq_len": 64, "vocab_size": 256, "dropout": 0.0},
          "parallel": {"engine": "deepspeed", "zero_stage": 2, "precision": "fp32"}, "optim": {"lr": 3e-3}}


class _CountingEngine(TinyEngine):
    """Counts every call the manager makes into the engine after construction."""

    checkpoint_name = "TinyEngine"

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.calls = 0

    def load_model_state_dict(self, sd):
        self.calls += 1
        super().load_model_state_dict(sd)

    def load_optimizer_state(self, sd):
        self.calls += 1
        super().load_optimizer_state(sd)


def _with(section: str, key: str, value):
    cfg = copy.deepcopy(CONFIG)
    cfg[section][key] = value
    return cfg


@pytest.fixture
def saved(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", _Layout(), keep_last=2)
    mgr.save(10, TinyEngine(seed=1), {"step": 10}, {"steps": 10}, CONFIG)
    return tmp_path / "run"


@pytest.mark.parametrize("section,key,value,fix", [
    ("model", "d_model", 128, "model.d_model=64"),
    ("model", "n_heads", 8, "model.n_heads=4"),
    ("model", "n_layers", 3, "model.n_layers=2"),
    ("model", "vocab_size", 512, "model.vocab_size=256"),
    ("model", "preset", "llama", "model.preset=gpt2"),
    ("parallel", "precision", "bf16", "parallel.precision=fp32"),
    ("parallel", "zero_stage", 3, "parallel.zero_stage=2"),
])
def test_mismatch_is_refused_naming_the_field_before_any_engine_call(saved, section, key, value, fix):
    engine = _CountingEngine()
    mgr = CheckpointManager(saved, _Layout(), keep_last=2)
    with pytest.raises(CheckpointError, match=rf"{section}\.{key}: checkpoint .*, this job .*{fix}"):
        mgr.resolve_verified("auto", engine, config=_with(section, key, value))
    assert engine.calls == 0


def test_every_mismatch_is_listed_at_once(saved):
    cfg = _with("model", "d_model", 32)
    cfg["parallel"]["precision"] = "bf16"
    with pytest.raises(CheckpointError) as e:
        CheckpointManager(saved, _Layout(), keep_last=2).resolve_verified("auto", _CountingEngine(), config=cfg)
    assert "model.d_model" in str(e.value) and "parallel.precision" in str(e.value)


def test_same_shape_resumes_and_harmless_changes_are_allowed(saved):
    cfg = _with("optim", "lr", 1e-4)  # not a shape: allowed
    cfg["model"]["dropout"] = 0.1
    engine = _CountingEngine()
    mgr = CheckpointManager(saved, _Layout(), keep_last=2)
    path = mgr.resolve_verified("auto", engine, config=cfg)
    assert path is not None and path.name == "step-00000010"
    mgr.load(path, engine)
    assert engine.calls == 2


def test_fallback_does_not_hide_a_mismatch(saved):
    with pytest.raises(CheckpointError, match="model.d_model"):
        CheckpointManager(saved, _Layout(), keep_last=2).resolve_verified(
            "auto", _CountingEngine(), fallback=True, config=_with("model", "d_model", 128))


def test_zero_stage_change_is_allowed_when_moments_load_by_name(tmp_path):
    """A sharded (Megatron-style) load restores moments by parameter name: the stage may change."""
    mgr = CheckpointManager(tmp_path / "run", _Layout(), keep_last=2)
    mgr.save(10, ShardedEngine(seed=1), {"step": 10}, {"steps": 10}, CONFIG)
    assert mgr.resolve_verified("auto", ShardedEngine(), config=_with("parallel", "zero_stage", 1)) is not None
    assert resume_mismatches(CONFIG, _with("parallel", "zero_stage", 1), loads_rank_partitions=True)
    assert not resume_mismatches(CONFIG, _with("parallel", "zero_stage", 1), loads_rank_partitions=False)


class Precision(enum.Enum):
    fp32 = "fp32"


def test_enum_members_compare_with_their_values_and_old_manifests_pass():
    assert not resume_mismatches(CONFIG, _with("parallel", "precision", Precision.fp32), True)
    assert not resume_mismatches(None, CONFIG, True)  # a checkpoint written before configs were recorded
