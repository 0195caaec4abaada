"""End-to-end: per-epoch window offsets through the real CLI on a corpus small enough that the runs
cross into the first shifted epoch: 1 rank and 2 ranks (ZeRO-0 / ZeRO-2) give the same losses,
a run crashed and resumed inside the shifted epoch repeats the uninterrupted one, and the shift is
really applied (the fixed-window run agrees through epoch 0 and departs after it).

Tolerances as in test_e2e_spine.py: dp=1 vs dp=2 sums the same gradients in another order (1e-5
relative); a resumed run repeats the same operations (1e-6 absolute).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY, max_rel_diff, metrics, run_cli

from dist_llm.data import TrainLoader
from dist_llm.prepare import build_stdlib_corpus

pytestmark = pytest.mark.slow

SEQ, LANES, GLOBAL = 32, 4, 8


def _first_shifted_step(train: Path) -> int:
    """The first step whose samples come from epoch 1 (read from the loader's own positions)."""
    ld = TrainLoader([(str(train), 1.0)], SEQ, LANES, 0, 1, GLOBAL, 1, 1234)
    state = ld.state_dict()
    for step in range(1, 500):
        ld.load_state_dict({**state, "steps": step})
        if ld.state_dict()["lane_positions"][0][0]["epoch"] >= 1:
            return step - 1  # the step that draws the sample at this position (0-based) -> its 1-based log step
    raise AssertionError("the corpus is too large for this test: no epoch boundary within 500 steps")


def test_shifted_epochs_keep_dp_equality_and_exact_resume(tmp_path):
    data = tmp_path / "small"
    build_stdlib_corpus(data, SEQ, max_bytes=40_000, samples_per_shard=16, val_every=20)
    b = _first_shifted_step(data / "train")
    assert 5 <= b <= 60, b
    steps, ckpt = b + 8, b + 3  # the checkpoint lies inside the shifted epoch
    common = ["data=shards", f"data.train=[{{path: {data / 'train'}, weight: 1.0}}]", f"data.lanes={LANES}",
              "data.num_workers=0", f"train.seq_len={SEQ}", f"train.global_batch_size={GLOBAL}",
              f"train.max_steps={steps}", "train.eval_every=0", f"train.checkpoint.every={ckpt}"]

    def train(name: str, *extra: str, check: bool = True):
        return run_cli(["train", *TINY, f"name={name}", *common, *extra], cwd=tmp_path, check=check)

    train("two", "launcher.nproc=2", "parallel=zero2")
    train("one", "launcher.nproc=1", "parallel=zero0")
    train("fixed", "launcher.nproc=1", "parallel=zero0", "data.window_offsets=fixed")
    first = train("res", "launcher.nproc=2", "parallel=zero2", f"debug.crash_at_step={ckpt}", check=False)
    assert first.returncode == 13, first.stderr[-3000:]
    second = train("res", "launcher.nproc=2", "parallel=zero2", f"debug.crash_at_step={ckpt}")
    assert "resumed from" in second.stderr

    runs = {n: metrics(tmp_path / "runs" / n) for n in ("two", "one", "fixed", "res")}
    every = range(1, steps + 1)
    assert sorted(runs["two"]) == list(every)
    assert max_rel_diff(runs["one"], runs["two"], every) < 1e-5
    assert max(abs(runs["res"][s] - runs["two"][s]) for s in range(ckpt + 1, steps + 1)) <= 1e-6
    # epoch 0 reads the stored windows in both settings; the shifted epoch departs from fixed
    assert max(abs(runs["fixed"][s] - runs["one"][s]) for s in range(1, b + 1)) <= 1e-6
    assert max(abs(runs["fixed"][s] - runs["one"][s]) for s in range(b + 1, steps + 1)) > 1e-4
