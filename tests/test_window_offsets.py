"""Per-epoch window offsets (data.window_offsets): the offset function, the shifted windows the
lane loader serves (cross-shard, wrapped at the stream's end), exact resume and dp-independence.

The test split's token stream is 0, 1, 2, ... so every token names its own stream position: a
sample is a correct shifted window exactly when it is ``(start + arange(L)) % stream_len``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from dist_llm.config.validate import ConfigError, validate
from dist_llm.config.store import compose
from dist_llm.data import ShardWriter, TrainLoader
from dist_llm.data.windows import FIXED, PER_EPOCH, FirstWindows, shift_windows, window_offset

SEQ = 8
L = SEQ + 1  # stored window (sample) length
PER_SHARD, SHARDS = 10, 8
N = PER_SHARD * SHARDS  # windows in the stream
TOKENS = N * L
LANES, MICRO = 4, 2  # G = 8 samples per step, 2 per lane: one epoch = 80 / 8 = 10 steps
EPOCH_STEPS = N // (LANES * MICRO)


def write_stream(d: Path, n: int = N, per_shard: int = PER_SHARD, first: int = 0) -> str:
    """Stored window g is stream tokens [g*L, (g+1)*L) and the token at position t is t (+first)."""
    with ShardWriter(d, SEQ, 4096, per_shard) as w:
        for g in range(n):
            w.add(first + g * L + np.arange(L))
    return str(d)


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    root = tmp_path_factory.mktemp("stream")
    return {"a": write_stream(root / "a"), "b": write_stream(root / "b", n=40, per_shard=10, first=2000)}


def loader(srcs, dp_rank=0, dp=1, seed=3, offsets=PER_EPOCH, workers=0) -> TrainLoader:
    accum = LANES * MICRO // (MICRO * dp) if dp <= LANES else 1
    return TrainLoader(srcs, SEQ, LANES, dp_rank, dp, MICRO, accum, seed, num_workers=workers,
                       window_offsets=offsets)


def global_steps(lds: List[TrainLoader], steps: int) -> List[torch.Tensor]:
    """Each step's global batch (ranks in order, micro-batches in order)."""
    return [torch.cat([b for ld in lds for b in ld.next_step()]) for _ in range(steps)]


# --- the offset function -------------------------------------------------------------------------

def test_offset_is_a_pure_function_of_seed_epoch_source():
    for e in range(40):
        for s in range(3):
            o = window_offset(11, e, s, 65)
            assert o == window_offset(11, e, s, 65) and 0 <= o < 65
    assert window_offset(11, 0, 0, 65) == window_offset(11, 0, 1, 65) == 0  # epoch 0 reads stored windows
    firsts = [window_offset(11, e, 0, 65) for e in range(65)]
    assert sorted(firsts) == list(range(65))  # the first L epochs: every boundary once
    assert firsts != [window_offset(11, e, 1, 65) for e in range(65)]  # sources differ
    assert firsts != [window_offset(12, e, 0, 65) for e in range(65)]  # seeds differ
    later = [window_offset(11, e, 0, 65) for e in range(65, 129)]
    assert sorted(later) == list(range(1, 65)) and later != firsts[1:]  # a fresh order per block
    assert all(window_offset(11, e, 0, 65, FIXED) == 0 for e in range(20))
    with pytest.raises(ValueError, match="data.window_offsets='sometimes'.*per_epoch, fixed"):
        window_offset(11, 1, 0, 65, "sometimes")


def test_shift_windows_reads_across_the_next_window():
    stream = np.arange(5 * L)
    rows = stream[:4 * L].reshape(4, L)
    for o in range(L):
        got = shift_windows(rows, stream[4 * L:], o)
        assert np.array_equal(got, np.stack([stream[g * L + o:(g + 1) * L + o] for g in range(4)]))
    with pytest.raises(ValueError, match="outside"):
        shift_windows(rows, stream[4 * L:], L)


def test_first_windows_keeps_the_most_recent_heads_and_reads_the_rest():
    heads, reads = FirstWindows(limit=2), []

    def read(k):
        return lambda: reads.append(k) or np.arange(3 * L).reshape(3, L) + 100 * k

    for k in range(3):
        heads.put(k, np.arange(3 * L).reshape(3, L) + 100 * k)
    assert np.array_equal(heads.get(2, read(2)), 200 + np.arange(L)) and reads == []
    assert np.array_equal(heads.get(0, read(0)), np.arange(L)) and reads == [0]  # evicted: read again


# --- the loader ----------------------------------------------------------------------------------

def _check_windows(x: torch.Tensor) -> np.ndarray:
    """Every row is a contiguous (cyclic) slice of the stream; returns the start positions."""
    x = x.numpy()
    starts = x[:, 0]
    assert np.array_equal(x, (starts[:, None] + np.arange(L)) % TOKENS), "a sample is not a window of the stream"
    return starts


def test_every_epoch_covers_the_stream_once_at_its_own_boundaries(stream):
    ld = loader([(stream["a"], 1.0)])
    offsets = []
    for e in range(6):
        x = torch.cat(global_steps([ld], EPOCH_STEPS))
        starts = _check_windows(x)
        o = int(starts[0] % L)
        assert o == window_offset(3, e, 0, L)
        assert sorted(starts.tolist()) == [(g * L + o) % TOKENS for g in range(N)]  # each window once
        assert sorted(x.flatten().tolist()) == list(range(TOKENS))  # so every token once, the tail wrapped
        offsets.append(o)
    assert offsets[0] == 0 and len(set(offsets)) == 6  # new boundaries every epoch
    pos = ld.state_dict()["lane_positions"][0][0]  # the next sample: the start of epoch 6
    assert pos["epoch"] == 6 and pos["window_offset"] == window_offset(3, 6, 0, L)


def test_fixed_reads_the_stored_windows_every_epoch(stream):
    ld = loader([(stream["a"], 1.0)], offsets=FIXED)
    for _ in range(3):
        starts = _check_windows(torch.cat(global_steps([ld], EPOCH_STEPS)))
        assert sorted(starts.tolist()) == [g * L for g in range(N)]
    assert ld.state_dict()["window_offsets"] == "fixed"


def test_global_batches_do_not_depend_on_dp(stream):
    srcs = [(stream["a"], 1.0)]
    steps = 5 * EPOCH_STEPS + 3
    ref = global_steps([loader(srcs)], steps)
    for dp in (2, 4):
        lds = [loader(srcs, r, dp) for r in range(dp)]
        if dp == 4:  # one head kept: nearly every shifted shard reads its successor afresh
            for ld in lds:
                ld._stream._heads.limit = 1
        got = global_steps(lds, steps)
        for t, (a, b) in enumerate(zip(ref, got)):
            assert torch.equal(a, b), f"dp={dp} step {t} differs"
    assert len({int(x[0, 0]) % L for x in ref[::EPOCH_STEPS]}) > 1  # the comparison spans shifted epochs


@pytest.mark.parametrize("at", [EPOCH_STEPS - 1, EPOCH_STEPS, 2 * EPOCH_STEPS + 4])
def test_resume_mid_epoch_is_exact_also_on_another_dp(stream, at):
    srcs = [(stream["a"], 0.6), (stream["b"], 0.4)]
    total = at + 2 * EPOCH_STEPS
    want = global_steps([loader(srcs)], total)
    first = loader(srcs)
    global_steps([first], at)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["window_offsets"] == "per_epoch"
    for dp in (1, 2):
        resumed = [loader(srcs, r, dp) for r in range(dp)]
        for ld in resumed:
            ld.load_state_dict(state)
        got = global_steps(resumed, total - at)
        for t, (a, b) in enumerate(zip(want[at:], got)):
            assert torch.equal(a, b), f"dp={dp}: step {at + t} differs after resume at {at}"


def test_blended_sources_shift_independently(stream):
    ld = loader([(stream["a"], 0.5), (stream["b"], 0.5)])
    x = torch.cat(global_steps([ld], 40)).numpy()
    b_rows = x[x[:, 0] >= 2000] - 2000  # source b's tokens start at 2000
    a_rows = x[x[:, 0] < 2000]
    assert np.array_equal(a_rows, (a_rows[:, :1] + np.arange(L)) % TOKENS)
    assert np.array_equal(b_rows, (b_rows[:, :1] + np.arange(L)) % (40 * L))
    b_offsets = {int(v) % L for v in b_rows[:, 0]}
    assert b_offsets == {window_offset(3, e, 1, L) for e in range(len(b_offsets))}


def test_workers_serve_the_same_shifted_windows(stream):
    srcs = [(stream["a"], 1.0)]
    ref = global_steps([loader(srcs)], 3 * EPOCH_STEPS)
    ld = loader(srcs, workers=2)
    try:
        got = global_steps([ld], 3 * EPOCH_STEPS)
    finally:
        ld.close()
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_resume_refuses_a_changed_setting_and_reads_old_states_as_fixed(stream):
    srcs = [(stream["a"], 1.0)]
    state = loader(srcs, offsets=FIXED).state_dict()
    with pytest.raises(ValueError, match=r"data.window_offsets: checkpoint 'fixed', now 'per_epoch' "
                                         r"\(set data.window_offsets=fixed"):
        loader(srcs).load_state_dict(state)
    del state["window_offsets"]  # a state written before the setting existed read stored windows
    loader(srcs, offsets=FIXED).load_state_dict(state)
    with pytest.raises(ValueError, match="data.window_offsets"):
        loader(srcs).load_state_dict(state)
    with pytest.raises(ValueError, match="per_epoch, fixed"):
        loader(srcs, offsets="random")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> str:
    from dist_llm.config.store import compose_prepare
    from dist_llm.prepare.pipeline import run_prepare

    out = tmp_path_factory.mktemp("digits")
    run_prepare(compose_prepare([f"output_dir={out}", "input=digits", "pack=image", "dedup=none",
                                 "split.val_fraction=0.1", "pack.samples_per_shard=200", "workers=1"]))
    return str(out / "train")


def test_record_packs_read_samples_whole(images):
    from dist_llm.data.batches import decode_image_batch
    from dist_llm.data.shards import IMAGES_FORMAT

    def decode(samples, step, idx):
        return decode_image_batch(samples, 0, step, idx)

    ld = TrainLoader([(images, 1.0)], 32, 2, 0, 1, 4, 1, 0, fmt=IMAGES_FORMAT, decode=decode,
                     window_offsets=PER_EPOCH)
    assert ld.state_dict()["window_offsets"] == "fixed"  # no token stream: nothing to shift
    assert ld.next_step()[0]["pixel_values"].shape[0] == 4


# --- the config ----------------------------------------------------------------------------------

def test_config_default_is_per_epoch_and_the_choice_is_checked():
    cfg = compose([])
    assert cfg.data.window_offsets == "per_epoch"
    assert compose(["data.window_offsets=fixed"]).data.window_offsets == "fixed"
    with pytest.raises(Exception, match="window_offsets"):
        compose(["data.window_offsets=sometimes"])
    cfg.data.window_offsets = "sometimes"  # built in Python: validate() names it
    with pytest.raises(ConfigError, match="data.window_offsets='sometimes' is not one of per_epoch, fixed"):
        validate(cfg, 1)
