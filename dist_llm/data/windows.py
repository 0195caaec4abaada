"""Per-epoch window offsets for causal token data (``data.window_offsets``).

Why: ``dist-llm prepare pack=causal`` cuts a split's token stream (documents joined with EOS)
into stored windows of ``L = seq_len + 1`` tokens: window ``g`` is tokens ``[g*L, (g+1)*L)``,
and shard ``k`` holds a contiguous run of windows. Read as stored, every epoch over a small
corpus sees the same windows at the same token boundaries (only their order changes), so the
model sees the same contexts again and again. With ``per_epoch``, epoch ``e`` of source ``s``
reads window ``g`` shifted by ``o = window_offset(seed, e, s)`` tokens instead: tokens
``[g*L + o, (g+1)*L + o)`` of the source's stream, i.e. the tail of stored window ``g`` and the
head of window ``g + 1`` (possibly the first window of the next shard in manifest order). The
last window of the stream wraps round to the first, so every epoch still covers every token of
the stream exactly once and has exactly as many samples as stored windows: the lane arithmetic
(positions, epoch lengths, the resume state) is untouched.

The offset depends only on ``(seed, epoch, source)``: never on the lane, the data-parallel rank
or the step, so batches stay independent of dp and a resume recomputes it. Epoch 0 reads the
windows as stored (offset 0: a run shorter than one epoch reads the same samples either way);
epochs ``1 .. L-1`` take the
non-zero offsets ``1 .. L-1`` in a seeded order, each once, so no two of the first ``L`` epochs
share a boundary; later epochs draw a fresh order per block of ``L - 1`` epochs.

Record packs (bert, image, classify, sft) have no token stream; their samples are read whole.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

import numpy as np

PER_EPOCH, FIXED = "per_epoch", "fixed"
WINDOW_OFFSETS = (PER_EPOCH, FIXED)
_TAG_OFFSETS = 3  # keeps this RNG stream apart from the loader's shard (1) and sample (2) streams


def check_mode(mode: str) -> str:
    if str(mode) not in WINDOW_OFFSETS:
        raise ValueError(f"data.window_offsets={mode!r} is not one of {', '.join(WINDOW_OFFSETS)}: per_epoch "
                         f"shifts the causal token windows every epoch, fixed reads them as prepared")
    return str(mode)


def window_offset(seed: int, epoch: int, source: int, sample_len: int, mode: str = PER_EPOCH) -> int:
    """How many tokens epoch ``epoch`` of source ``source`` shifts its windows, in ``[0, sample_len)``."""
    if check_mode(mode) == FIXED or epoch <= 0 or sample_len < 2:
        return 0
    block, i = divmod(int(epoch) - 1, sample_len - 1)
    seq = np.random.SeedSequence([int(seed) % (1 << 64), _TAG_OFFSETS, int(source), block])
    return 1 + int(np.random.default_rng(seq).permutation(sample_len - 1)[i])


def shift_windows(rows: np.ndarray, next_head: np.ndarray, offset: int) -> np.ndarray:
    """``rows`` ([n, L], consecutive stored windows) shifted ``offset`` tokens along the stream.

    ``next_head`` is the window that follows ``rows[-1]`` in the stream (its first ``offset``
    tokens end the last shifted window). Row ``i`` of the result is tokens
    ``[offset, offset + L)`` of ``rows[i] ++ rows[i + 1]``.
    """
    n, width = rows.shape
    if not 0 <= offset < width:
        raise ValueError(f"window offset {offset} is outside [0, {width})")
    if offset == 0 or n == 0:
        return rows
    if next_head.shape != (width,):
        raise ValueError(f"the next window has shape {next_head.shape}, expected ({width},)")
    flat = np.concatenate([rows.reshape(-1), next_head[:offset]])
    return np.ascontiguousarray(flat[offset:offset + n * width].reshape(n, width))



class FirstWindows:
    """The first stored window of recently read shards: what a shifted window of the shard before
    each ends with. Every full shard read feeds it, so a head costs one extra shard read at most,
    none when this process read that shard before; ``limit`` rows are kept (least recent dropped)."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._rows: "OrderedDict[Hashable, np.ndarray]" = OrderedDict()

    def put(self, key: Hashable, rows: np.ndarray) -> None:
        self._rows[key] = rows[0].copy()
        self._rows.move_to_end(key)
        if len(self._rows) > self.limit:
            self._rows.popitem(last=False)

    def get(self, key: Hashable, read_rows: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self._rows:
            self.put(key, read_rows())
        self._rows.move_to_end(key)
        return self._rows[key]
