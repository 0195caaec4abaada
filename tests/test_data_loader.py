"""The lane loader: dp-invariance, epochs, blending, exact resume, workers, validation slices."""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from dist_llm.data import BlendSchedule, ShardWriter, TrainLoader, ValLoader

SEQ = 16
L = 4  # lanes
MICRO = 2  # G = 8 samples per step, 2 per lane


def make_split(d: Path, tag: int, n: int = 395, per_shard: int = 10, vocab: int = 60000) -> str:
    """Sample i of source `tag` is [tag, i, i+1, ...]: its identity is readable from the batch."""
    with ShardWriter(d, SEQ, vocab, per_shard) as w:
        for i in range(n):
            w.add(np.concatenate([[tag], (i + np.arange(SEQ)) % vocab]))
    return str(d)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("data")
    # 40 shards, the last one short (5): epochs differ in length and excess is dropped
    return {"a": make_split(root / "a", 1), "b": make_split(root / "b", 2, n=200),
            "val": make_split(root / "val", 3, n=57), "root": root}


def loader(srcs, dp_rank=0, dp=1, accum=4, seed=7, workers=0, lanes=L, offsets="per_epoch") -> TrainLoader:
    return TrainLoader(srcs, SEQ, lanes, dp_rank, dp, MICRO, accum, seed, num_workers=workers,
                       window_offsets=offsets)


def flat(batches: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat(batches)


def test_batches_do_not_depend_on_dp(data: dict) -> None:
    src = [(data["a"], 1.0)]
    # fixed windows: the sample identities read below are those of the stored windows (shifted
    # windows have their own dp test in test_window_offsets.py)
    one = loader(src, offsets="fixed")
    two = [loader(src, r, 2, accum=2, offsets="fixed") for r in range(2)]
    four = [loader(src, r, 4, accum=1, offsets="fixed") for r in range(4)]
    seen = []
    # one lane epoch is ~95-100 samples = ~48 steps; 160 steps cover 3+ epochs
    for _ in range(160):
        ref = one.next_step()
        assert len(ref) == 4 and all(b.shape == (MICRO, SEQ + 1) and b.dtype == torch.int64 for b in ref)
        b2 = [b for ld in two for b in ld.next_step()]
        b4 = [b for ld in four for b in ld.next_step()]
        for x, y, z in zip(ref, b2, b4):  # even the micro-batch grouping matches
            assert torch.equal(x, y) and torch.equal(x, z)
        seen.append(flat(ref))
    ids = torch.cat(seen)[:, 1].numpy()
    assert set(torch.cat(seen)[:, 0].tolist()) == {1}
    # epoch 0: the lanes together draw distinct samples until the shortest lane ends
    first = ids[:160]  # steps 0-19: every lane is still inside epoch 0 (>= 95 samples per lane)
    assert len(set(first.tolist())) == len(first)
    assert len(set(ids.tolist())) > 380  # nearly all 395 samples were visited
    assert all(row[0]["epoch"] == 3 for row in one.state_dict()["lane_positions"])


def test_epochs_are_lockstep_and_reshuffled(data: dict) -> None:
    ld = loader([(data["a"], 1.0)])
    per_lane: List[List[int]] = [[] for _ in range(L)]
    for _ in range(150):
        x = flat(ld.next_step())[:, 1].tolist()
        for lane in range(L):
            per_lane[lane].extend(x[lane * 2:(lane + 1) * 2])
    stream = ld._stream.streams[0]
    lens = [stream.starts[e + 1] - stream.starts[e] for e in range(2)]
    assert all(95 <= n <= 100 for n in lens)
    e0 = [i for lane in per_lane for i in lane[: lens[0]]]
    assert len(set(e0)) == len(e0)  # no sample twice within an epoch, across all lanes
    e1 = [lane[lens[0]:lens[0] + lens[1]] for lane in per_lane]
    assert [lane[: lens[0]] for lane in per_lane] != e1  # a new permutation each epoch


def test_no_rank_runs_dry(data: dict) -> None:
    for r in range(4):
        ld = loader([(data["a"], 1.0)], r, 4, accum=1)
        state = ld.state_dict()
        state["steps"] = 123_457
        ld.load_state_dict(state)
        for _ in range(3):
            assert ld.next_step()[0].shape == (MICRO, SEQ + 1)


def _check_resume(srcs, at: int, total: int, **kw) -> None:
    ref = loader(srcs, **kw)
    want = [flat(ref.next_step()) for _ in range(total)]
    first = loader(srcs, **kw)
    for _ in range(at):
        first.next_step()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = loader(srcs, **kw)
    resumed.load_state_dict(state)
    for t in range(at, total):
        assert torch.equal(flat(resumed.next_step()), want[t]), f"step {t} differs after resume at {at}"
    assert resumed.state_dict()["steps"] == total


def test_resume_across_epoch_boundary(data: dict) -> None:
    _check_resume([(data["a"], 1.0)], at=47, total=54)  # epoch 0 ends around step 48
    _check_resume([(data["a"], 1.0)], at=130, total=150, dp_rank=1, dp=2, accum=2)


def test_blend_fractions_and_resume(data: dict) -> None:
    srcs = [(data["a"], 0.7), (data["b"], 0.3)]
    ld = loader(srcs, offsets="fixed")  # column 0 tags the source only in the stored windows
    tags = torch.cat([flat(ld.next_step()) for _ in range(250)])[:, 0]
    frac = (tags == 1).float().mean().item()
    assert abs(frac - 0.7) < 0.01
    _check_resume(srcs, at=95, total=110)  # source b (20 shards, 50/lane) wraps epochs here
    pos = ld.state_dict()["lane_positions"]
    assert pos[0][0]["drawn"] == 350 and pos[0][1]["drawn"] == 150


def test_blend_schedule_matches_deficit_rule() -> None:
    for weights in ([0.7, 0.3], [1.0, 1.0, 1.0], [2.0, 1.0, 1.0], [0.55, 0.25, 0.2]):
        total = sum(Fraction(w).limit_denominator(1000) for w in weights)
        w = [Fraction(x).limit_denominator(1000) / total for x in weights]
        counts, naive = [0] * len(w), []
        for k in range(500):
            vals = [w[s] * (k + 1) - counts[s] for s in range(len(w))]
            best = vals.index(max(vals))
            counts[best] += 1
            naive.append(best)
        sched = BlendSchedule(weights)
        assert sched.picks(0, 500).tolist() == naive
        assert sched.counts_before(500).tolist() == counts
        assert sched.counts_before(10**9).sum() == 10**9


def test_workers_match_and_resume(data: dict) -> None:
    srcs = [(data["a"], 0.7), (data["b"], 0.3)]
    ref = loader(srcs)
    want = [flat(ref.next_step()) for _ in range(12)]
    w = loader(srcs, workers=2)
    for t in range(7):
        assert torch.equal(flat(w.next_step()), want[t])
    state = w.state_dict()
    w.load_state_dict(state)  # recreate the worker iterator mid-run
    assert torch.equal(flat(w.next_step()), want[7])
    w.close()
    r = loader(srcs, workers=2)
    r.load_state_dict(state)
    for t in range(7, 12):
        assert torch.equal(flat(r.next_step()), want[t])
    r.close()
    ranks = [loader(srcs, k, 2, accum=2, workers=2) for k in range(2)]
    for ld in ranks:
        ld.load_state_dict(state)  # a dp=1 state resumes on dp=2: the global batch is dp-free
    assert torch.equal(torch.cat([flat(ld.next_step()) for ld in ranks]), want[7])
    for ld in ranks:
        ld.close()


def test_incompatible_resume_raises(data: dict) -> None:
    state = loader([(data["a"], 1.0)]).state_dict()
    with pytest.raises(ValueError, match="lanes: checkpoint 4, now 2"):
        loader([(data["a"], 1.0)], lanes=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        loader([(data["a"], 1.0)], seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        loader([(data["a"], 1.0)], accum=2).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        loader([(data["b"], 1.0)]).load_state_dict(state)
    with pytest.raises(ValueError, match="number of sources"):
        loader([(data["a"], 0.5), (data["b"], 0.5)]).load_state_dict(state)


def test_layout_errors(data: dict, tmp_path: Path) -> None:
    few = make_split(tmp_path / "few", 9, n=30)
    with pytest.raises(ValueError, match=r"few has 3 non-empty shard\(s\) but data.lanes=4.*more, smaller shards"):
        loader([(few, 1.0)])
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 3"):
        loader([(data["a"], 1.0)], dp=3)
    with pytest.raises(ValueError, match="global batch 6 .* not divisible by data.lanes=4"):
        TrainLoader([(data["a"], 1.0)], SEQ, 4, 0, 1, 3, 2, 0)
    with pytest.raises(ValueError, match="dp_size\\*num_workers"):
        loader([(data["a"], 1.0)], dp=2, accum=2, workers=3)
    with pytest.raises(ValueError, match=r"seq_len 16 but train.seq_len is 8.*train.seq_len=16"):
        TrainLoader([(data["a"], 1.0)], 8, 4, 0, 1, 2, 4, 0)
    big = tmp_path / "big"
    with ShardWriter(big, SEQ, 70000, 10) as w:
        for i in range(40):
            w.add(np.full(SEQ + 1, i))
    with pytest.raises(ValueError, match="disagree on dtype"):
        loader([(data["a"], 1.0), (str(big), 1.0)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loader([(str(tmp_path / "missing"), 1.0)])


def test_val_loader_slices(data: dict) -> None:
    full = ValLoader(data["val"], SEQ, 0, 1, 4, 50)
    assert full.num_samples == 48  # rounded down to dp*micro = 4 ... and 8 below
    ref = torch.cat(full.batches())
    assert ref[:, 1].tolist() == list(range(48))
    for dp in (2, 4):
        parts = [ValLoader(data["val"], SEQ, r, dp, 2, 50) for r in range(dp)]
        got = torch.cat([torch.cat(p.batches()) for p in parts])
        n = parts[0].num_samples
        assert torch.equal(got, ref[:n]) and all(b.shape == (2, SEQ + 1) for p in parts for b in p.batches())
    assert [torch.equal(a, b) for a, b in zip(full.batches(), full.batches())] == [True] * 12
    assert ValLoader(data["val"], SEQ, 0, 1, 4, 10_000).num_samples == 56  # capped at the split's 57
    with pytest.raises(ValueError, match="no full batch"):
        ValLoader(data["val"], SEQ, 0, 4, 4, 10)
