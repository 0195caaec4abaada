"""Checkpoint pieces that need no process group: safe optimizer-state encoding, RNG round trip,
discovery of committed checkpoints."""
import enum
import io
import json
import random

import numpy as np
import pytest
import torch

from dist_llm.checkpoint.manager import CheckpointError, CheckpointManager, capture_rng, restore_rng
from dist_llm.parallel.deepspeed_engine import _LIVE, _overlay, _plain


class Stage(enum.IntEnum):
    TWO = 2


class Scaler:
    def __init__(self):
        self.cur_scale = 1.0


def test_plain_state_loads_with_weights_only_and_overlays_live_objects():
    live = {"loss_scaler": Scaler(), "zero_stage": Stage.TWO, "ds_version": "0.19",
            "base": {"state": {0: {"exp_avg": torch.ones(3)}}, "groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]}}
    plain = _plain(live)
    assert plain["loss_scaler"] == _LIVE and plain["zero_stage"] == _LIVE  # IntEnum is not plain
    buf = io.BytesIO()
    torch.save(plain, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # would raise on any pickled object
    merged = _overlay(loaded, live)
    assert merged["loss_scaler"] is live["loss_scaler"] and merged["zero_stage"] is Stage.TWO
    assert torch.equal(merged["base"]["state"][0]["exp_avg"], torch.ones(3))
    assert merged["base"]["groups"][0]["betas"] == (0.9, 0.95)


def test_rng_round_trip_is_exact():
    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


class _Layout:
    rank, world_size, dp = 0, 1, 1

    def barrier(self):
        pass


def test_latest_pointing_at_uncommitted_dir_is_a_clear_error(tmp_path):
    mgr = CheckpointManager(tmp_path, _Layout(), keep_last=2)
    assert mgr.latest() is None and mgr.resolve("auto") is None and mgr.resolve("never") is None
    (tmp_path / "checkpoints" / "step-00000005").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000005\n")
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        mgr.latest()
    (tmp_path / "checkpoints" / "step-00000005" / "manifest.json").write_text(json.dumps({"files": {}}))
    assert mgr.latest().name == "step-00000005"
    with pytest.raises(CheckpointError, match="neither a committed checkpoint"):
        mgr.resolve(str(tmp_path / "nowhere"))


def test_stale_tmp_dirs_are_removed(tmp_path):
    mgr = CheckpointManager(tmp_path, _Layout(), keep_last=2)
    (tmp_path / "checkpoints" / "step-00000010.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest.tmp").write_text("x")
    mgr.remove_stale()
    assert list((tmp_path / "checkpoints").iterdir()) == []
