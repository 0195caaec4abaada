"""bench.overhead's pair bookkeeping, in-process: steal read from /proc/stat, a pair measured
during heavy steal set aside and measured again, the number of attempts bounded."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import overhead
from bench._loops import cpu_ticks, steal_percent


def test_steal_percent_from_proc_stat():
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat here")
    before = cpu_ticks()
    sum(i * i for i in range(200_000))  # let a few ticks pass
    after = cpu_ticks()
    assert before is not None and after[1] >= before[1] and after[0] >= before[0]
    assert steal_percent((10, 1000), (15, 1100)) == pytest.approx(5.0)
    assert steal_percent(None, after) is None and steal_percent(after, after) is None


def _fake_pairs(monkeypatch, steals):
    seen, order = [], []

    def one_pair(job, world, i, plain_first):
        seen.append(i)
        order.append(plain_first)
        s = steals[i]
        return {"plain": 100.0, "ours": 90.0 + i, "ratio": (90.0 + i) / 100, "step_ratio": 0.9, "steal_percent": [s, s]}

    monkeypatch.setattr(overhead, "_one_pair", one_pair)
    return seen, order


def test_pair_with_heavy_steal_is_measured_again(monkeypatch):
    seen, order = _fake_pairs(monkeypatch, [1.0, 12.0, 2.0, 0.5])
    out = overhead.pairs_job({"pairs": 3, "max_steal": 5.0}, rank=0, world=1)
    assert seen == [0, 1, 2, 3]
    # the kept pairs (attempts 0, 2, 3) alternate which side runs first; the rejected one repeats its turn
    assert order == [True, False, False, True]
    assert out["ratio"] == [0.90, 0.92, 0.93] and len(out["rejected"]) == 1
    assert out["rejected"][0]["ratio"] == 0.91


def test_attempts_are_bounded_and_zero_keeps_everything(monkeypatch):
    seen, _ = _fake_pairs(monkeypatch, [50.0] * 10)
    out = overhead.pairs_job({"pairs": 2, "max_steal": 5.0}, rank=0, world=1)
    assert len(seen) == 4 and len(out["rejected"]) == 3 and len(out["ratio"]) == 1  # the last attempt is kept
    seen, _ = _fake_pairs(monkeypatch, [50.0] * 10)
    out = overhead.pairs_job({"pairs": 2, "max_steal": 0}, rank=0, world=1)
    assert len(seen) == 2 and out["rejected"] == [] and len(out["ratio"]) == 2
