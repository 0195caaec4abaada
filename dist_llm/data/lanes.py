"""The lane streams under :class:`dist_llm.data.loader.TrainLoader`: sources, blending, shard order.

Why lanes: the batches a run sees must not depend on how many data-parallel ranks read them,
so a job can be resumed on a different number of ranks (or checked against a dp=1 run). The
data is read as ``L = data.lanes`` independent shard streams; the global batch of ``G`` samples
takes ``G/L`` from every lane, lane-major, and DP rank ``r`` of ``dp`` owns the contiguous lanes
``[r*L/dp, (r+1)*L/dp)``. Any ``dp`` dividing ``L`` therefore cuts the same global batch.

* Epoch ``e`` of source ``s``: its shards are permuted by an RNG seeded by ``(seed, e, s)``;
  lane ``l`` gets ``perm[l::L]``; each shard's samples are permuted by an RNG seeded by
  ``(seed, e, s, shard)``. Every lane's epoch length is the minimum over lanes (the excess is
  dropped) so lanes stay in lockstep. Streams repeat forever over epochs.
* Blending: draw ``k`` of a lane takes source ``argmax_s(w_s*(k+1) - count_s)`` (ties: lowest
  index). No RNG, so the whole state is the number of steps consumed; positions are recomputed
  arithmetically from the manifests' per-shard counts, never by re-reading data.
* Causal token data: epoch ``e`` of source ``s`` reads its windows shifted by an offset from
  ``(seed, e, s)`` along the source's token stream (``data.window_offsets``, :mod:`.windows`).

Bad samples (``data.bad_samples``) are checked here, per shard, as it is read. Nothing
distributed: ranks arrive as plain ints.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dist_llm.data.shard_scan import read_checked_records, read_token_shard
from dist_llm.data.shards import FORMAT, PAIRS_FORMAT, check_checksums, manifest_where
from dist_llm.data.sources import FetchOptions, location, read_split_manifest, remote_bytes
from dist_llm.data.windows import FIXED, PER_EPOCH, FirstWindows, check_mode, shift_windows, window_offset

log = logging.getLogger("dist_llm.data")
BAD_SAMPLE_POLICIES = ("raise", "skip")

_TAG_SHARDS, _TAG_SAMPLES = 1, 2
_MAX_BLEND_PERIOD = 1 << 16


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % (1 << 64), *keys]))


class BlendSchedule:
    """The deficit rule ``argmax_s(w_s*(k+1) - count_s)`` in exact integer arithmetic.

    Weights are rationalised to small integers ``W`` (total ``T``); then the rule is the
    smooth weighted round robin, which picks every source exactly ``W_s`` times in each
    period of ``T`` draws. One period is computed once, so the counts after any number of
    draws are O(1) and resuming at step 10^6 costs nothing.
    """

    def __init__(self, weights: Sequence[float]) -> None:
        if not weights or any(not (w > 0 and math.isfinite(w)) for w in weights):
            raise ValueError(f"blend weights must be positive and finite, got {list(weights)}")
        top = max(weights)
        fr = [max(Fraction(w / top).limit_denominator(10_000), Fraction(1, 10_000)) for w in weights]
        den = math.lcm(*(f.denominator for f in fr))
        ints = [int(f * den) for f in fr]
        if sum(ints) > _MAX_BLEND_PERIOD:  # awkward ratios: quantise, largest remainder
            total = sum(weights)
            exact = [w / total * _MAX_BLEND_PERIOD for w in weights]
            ints = [max(1, int(x)) for x in exact]
            order = sorted(range(len(ints)), key=lambda i: -(exact[i] - int(exact[i])))
            for i in order[: max(0, _MAX_BLEND_PERIOD - sum(ints))]:
                ints[i] += 1
        g = math.gcd(*ints)
        self.W = np.array([w // g for w in ints], dtype=np.int64)
        self.period = int(self.W.sum())
        seq = np.empty(self.period, dtype=np.int64)
        cur = [0] * len(ints)
        W = self.W.tolist()
        for k in range(self.period):
            vals = [c + w for c, w in zip(cur, W)]
            best = vals.index(max(vals))  # index() finds the lowest index among ties
            vals[best] -= self.period
            cur = vals
            seq[k] = best
        assert not any(cur), "smooth weighted round robin did not close its period"
        self.seq = seq
        onehot = np.zeros((self.period + 1, len(W)), dtype=np.int64)
        onehot[np.arange(1, self.period + 1), seq] = 1
        self.cum = np.cumsum(onehot, axis=0)  # cum[k] = picks per source among draws < k

    def counts_before(self, n: int) -> np.ndarray:
        """How many of the first ``n`` draws went to each source."""
        q, r = divmod(int(n), self.period)
        return q * self.W + self.cum[r]

    def picks(self, start: int, stop: int) -> np.ndarray:
        return self.seq[np.arange(start, stop) % self.period]


@dataclass
class Source:
    path: str
    weight: float
    manifest: Dict[str, Any]
    files: List[str]  # non-empty shards, manifest order
    sha: List[Optional[str]]
    counts: np.ndarray
    fingerprint: str
    first: List[int]  # global index (tar key) of each shard's first sample
    names: List[str]  # the manifest's file names (files holds where they are: path or URL)


# decode(samples, step, global sample indices) -> batch dict: how a task turns records into tensors
Decode = Callable[[List[Dict[str, Any]], int, List[int]], Dict[str, torch.Tensor]]


def check_format(path: str, m: Dict[str, Any], fmt: str, seq_len: int) -> None:
    got = m.get("format")
    if got != fmt:
        raise ValueError(f"{manifest_where(path)} holds format {got!r} but the task reads {fmt!r}: "
                         f"prepare the data with the matching pack (causal for task=pretrain, bert for "
                         f"task=mlm_nsp, image for task=classify) or pick the task that fits the data")
    if fmt == PAIRS_FORMAT and m.get("seq_len") != seq_len:
        raise ValueError(f"{manifest_where(path)} has seq_len {m.get('seq_len')} but train.seq_len is "
                         f"{seq_len}: set train.seq_len={m.get('seq_len')} or re-run `dist-llm prepare pack=bert` "
                         f"with pack.seq_len={seq_len}")


def load_source(path: str, weight: float, seq_len: int, require_checksums: bool = True,
                 fmt: str = FORMAT, fetch: Optional[FetchOptions] = None) -> Source:
    m = read_split_manifest(path, fmt, fetch)
    check_checksums(path, m, require_checksums)
    if fmt != FORMAT:
        check_format(path, m, fmt, seq_len)
    elif m["sample_len"] != seq_len + 1:
        raise ValueError(
            f"{manifest_where(path)} has seq_len {m['seq_len']} but train.seq_len is "
            f"{seq_len}: set train.seq_len={m['seq_len']} or re-run `dist-llm prepare` with "
            f"seq_len={seq_len}"
        )
    starts = np.concatenate([[0], np.cumsum([s["num_samples"] for s in m["shards"]])]).tolist()
    first = [int(starts[i]) for i, s in enumerate(m["shards"]) if s["num_samples"] > 0]
    shards = [s for s in m["shards"] if s["num_samples"] > 0]
    body = {k: m.get(k) for k in ("seq_len", "dtype", "vocab_size", "num_samples")}
    body["shards"] = [[s["file"], s["num_samples"], s.get("sha256")] for s in m["shards"]]
    fp = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return Source(
        path=str(path), weight=float(weight), manifest=m,
        files=[location(path, s["file"]) for s in shards], sha=[s.get("sha256") for s in shards],
        counts=np.array([s["num_samples"] for s in shards], dtype=np.int64), fingerprint=fp, first=first,
        names=[str(s["file"]) for s in shards],
    )


class _SourceStream:
    """Where the p-th sample a lane draws from one source lives: (epoch, shard, offset)."""

    def __init__(self, src: Source, index: int, lanes: int, seed: int) -> None:
        if len(src.files) < lanes:
            raise ValueError(
                f"data source {src.path} has {len(src.files)} non-empty shard(s) but data.lanes="
                f"{lanes}: every lane needs at least one shard per epoch; write more, smaller shards "
                f"(`dist-llm prepare` with a smaller samples_per_shard) or lower data.lanes"
            )
        self.src, self.index, self.lanes, self.seed = src, index, lanes, seed
        self.starts = [0]  # starts[e] = first lane position of epoch e
        self._plans: "OrderedDict[int, Tuple[List[np.ndarray], List[np.ndarray], int]]" = OrderedDict()

    def _perm(self, epoch: int) -> np.ndarray:
        return _rng(self.seed, _TAG_SHARDS, epoch, self.index).permutation(len(self.src.files))

    def plan(self, epoch: int) -> Tuple[List[np.ndarray], List[np.ndarray], int]:
        """Per lane: its shards and their inclusive cumulative sample counts; the epoch length."""
        if epoch in self._plans:
            self._plans.move_to_end(epoch)
            return self._plans[epoch]
        perm = self._perm(epoch)
        shards = [perm[l :: self.lanes] for l in range(self.lanes)]
        cums = [np.cumsum(self.src.counts[s]) for s in shards]
        plan = (shards, cums, int(min(c[-1] for c in cums)))
        self._plans[epoch] = plan
        if len(self._plans) > 4:
            self._plans.popitem(last=False)
        return plan

    def _epoch_len(self, epoch: int) -> int:
        if epoch in self._plans:
            return self._plans[epoch][2]
        perm = self._perm(epoch)
        return int(min(self.src.counts[perm[l :: self.lanes]].sum() for l in range(self.lanes)))

    def locate(self, lane: int, pos: int) -> Tuple[int, int, int]:
        while self.starts[-1] <= pos:
            self.starts.append(self.starts[-1] + self._epoch_len(len(self.starts) - 1))
        epoch = bisect.bisect_right(self.starts, pos) - 1
        shards, cums, _ = self.plan(epoch)
        i = pos - self.starts[epoch]
        k = int(np.searchsorted(cums[lane], i, side="right"))
        return epoch, int(shards[lane][k]), int(i - (cums[lane][k - 1] if k else 0))

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_plans"] = OrderedDict()
        return state


class LaneStream:
    """All lanes of a blend; picklable so DataLoader workers can own a copy."""

    def __init__(self, sources: List[Source], lanes: int, per_lane: int, seed: int,
                 bad_samples: str = "raise", max_bad_fraction: float = 0.0,
                 fetch: Optional[FetchOptions] = None, window_offsets: str = PER_EPOCH) -> None:
        if bad_samples not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"data.bad_samples={bad_samples!r} is not one of {', '.join(BAD_SAMPLE_POLICIES)}")
        self.bad_samples, self.max_bad_fraction = bad_samples, float(max_bad_fraction)
        self.bad_by_shard: Dict[str, int] = {}  # shard file -> bad samples skipped (each shard counted once)
        self.read_by_shard: Dict[str, int] = {}
        self.sources, self.fetch = sources, fetch
        self.streams = [_SourceStream(s, i, lanes, seed) for i, s in enumerate(sources)]
        self.blend = BlendSchedule([s.weight for s in sources])
        self.per_lane, self.seed = per_lane, seed
        self.records = sources[0].manifest.get("format", FORMAT) != FORMAT  # sample dicts, not token rows
        self.format = sources[0].manifest.get("format", FORMAT)
        self.sample_len = int(sources[0].manifest.get("sample_len", 0))
        self.dtype = sources[0].manifest.get("dtype", "uint8")
        self._cache: Dict[Tuple[int, int], Tuple[int, int, np.ndarray]] = {}
        # record packs have no token stream to shift: their samples are always read whole
        self.window_offsets = FIXED if self.records else check_mode(window_offsets)
        self._heads = FirstWindows()  # (source, shard) -> its first stored window

    def offset(self, epoch: int, s: int) -> int:
        return window_offset(self.seed, epoch, s, self.sample_len, self.window_offsets)

    def _shard(self, lane: int, s: int, epoch: int, shard: int) -> np.ndarray:
        hit = self._cache.get((lane, s))
        if hit is not None and hit[0] == epoch and hit[1] == shard:
            return hit[2]
        rows = self._checked_rows(self.sources[s], shard)
        if not self.records:
            self._heads.put((s, shard), rows)
        o = self.offset(epoch, s)
        if o:  # the shifted windows end in the next shard's first window (the stream wraps at its end)
            nxt = (shard + 1) % len(self.sources[s].files)
            rows = shift_windows(rows, self._heads.get((s, nxt), lambda: self._checked_rows(self.sources[s], nxt)), o)
        rows = rows[_rng(self.seed, _TAG_SAMPLES, epoch, s, shard).permutation(rows.shape[0])]
        self._cache[(lane, s)] = (epoch, shard, rows)
        return rows

    def _checked_rows(self, src: Source, shard: int) -> np.ndarray:
        """The shard's ``counts[shard]`` rows in manifest order. A bad sample raises (naming shard and
        key) or, with ``data.bad_samples=skip``, is counted and its slot takes the shard's next good
        sample: the lane positions stay pure arithmetic, so resume and dp-independence hold."""
        file, n = src.files[shard], int(src.counts[shard])
        data = remote_bytes(file, src.sha[shard], self.fetch)  # None: a local file, read below
        if self.records:  # BERT pairs / images: structural check only (a bad sample raises)
            recs = read_checked_records(file, self.format, n, sha256=src.sha[shard], data=data)
            self.read_by_shard[file] = n
            out = np.empty(len(recs), dtype=object)
            for i, r in enumerate(recs):
                out[i] = r
            return out
        rows, good, problems = read_token_shard(file, self.sample_len, self.dtype, sha256=src.sha[shard],
                                                first_index=src.first[shard], num_samples=n, data=data)
        self.read_by_shard[file] = n
        if not problems:
            return rows
        if self.bad_samples != "skip":
            raise ValueError(f"{problems[0]}; the shard does not match its manifest: re-run `dist-llm prepare`, "
                             f"or skip bad samples with data.bad_samples=skip")
        nbad = int((~good).sum())
        for msg in problems[:3]:
            log.warning("data.bad_samples=skip: %s", msg)
        self.bad_by_shard[file] = nbad
        bad, read = self.bad_count, sum(self.read_by_shard.values())
        if not good.any():
            raise ValueError(f"shard {file} has no readable sample ({problems[0]}); re-run `dist-llm prepare`")
        if bad > self.max_bad_fraction * read:
            raise ValueError(f"data.bad_samples=skip: {bad} of the {read} samples in the shards read so far are bad, "
                             f"more than data.max_bad_fraction={self.max_bad_fraction}; the data is damaged: "
                             f"re-run `dist-llm prepare` (first problem: {problems[0]})")
        ok = np.flatnonzero(good)
        return rows[ok[np.searchsorted(ok, np.arange(n)) % len(ok)]]

    @property
    def bad_count(self) -> int:
        return sum(self.bad_by_shard.values())

    def lane_chunk(self, lane: int, step: int) -> np.ndarray:
        """The ``per_lane`` samples lane ``lane`` contributes to global step ``step``."""
        start = step * self.per_lane
        picks = self.blend.picks(start, start + self.per_lane)
        pos = self.blend.counts_before(start)
        out = (np.empty(self.per_lane, dtype=object) if self.records
               else np.empty((self.per_lane, self.sample_len), dtype=self.dtype))
        for i, s in enumerate(picks.tolist()):
            epoch, shard, off = self.streams[s].locate(lane, int(pos[s]))
            out[i] = self._shard(lane, s, epoch, shard)[off]
            pos[s] += 1
        return out

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"], state["_heads"] = {}, FirstWindows()
        return state


class LaneDataset(IterableDataset):
    """Worker ``w`` yields ``(step, w, its lanes' chunk)`` for every step from ``start``."""

    def __init__(self, stream: LaneStream, worker_lanes: List[List[int]], start: int) -> None:
        super().__init__()
        self.stream, self.worker_lanes, self.start = stream, worker_lanes, start

    def __iter__(self) -> Iterator[Tuple[int, int, torch.Tensor]]:
        info = get_worker_info()
        w = info.id if info is not None else 0
        step = self.start
        while True:
            chunk = np.concatenate([self.stream.lane_chunk(l, step) for l in self.worker_lanes[w]])
            counts = (self.stream.bad_count, sum(self.stream.read_by_shard.values()))
            yield step, w, (chunk if self.stream.records else torch.from_numpy(chunk.astype(np.int64))), counts
            step += 1
