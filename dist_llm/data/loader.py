"""Deterministic, stateful, resumable loading of token shards with the "lane" design.

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

This module imports torch's DataLoader but nothing distributed: ranks arrive as plain ints.
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
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_llm.data.shard_scan import read_checked_records, read_shard, read_token_shard
from dist_llm.data.shards import FORMAT, PAIRS_FORMAT, check_checksums, manifest_where
from dist_llm.data.sources import FetchOptions, location, read_split_manifest, remote_bytes
from dist_llm.data.windows import FIXED, PER_EPOCH, FirstWindows, check_mode, shift_windows, window_offset

log = logging.getLogger("dist_llm.data")
BAD_SAMPLE_POLICIES = ("raise", "skip")

STATE_FORMAT = "dist-llm-loader/1"
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
class _Source:
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


def _check_format(path: str, m: Dict[str, Any], fmt: str, seq_len: int) -> None:
    got = m.get("format")
    if got != fmt:
        raise ValueError(f"{manifest_where(path)} holds format {got!r} but the task reads {fmt!r}: "
                         f"prepare the data with the matching pack (causal for task=pretrain, bert for "
                         f"task=mlm_nsp, image for task=classify) or pick the task that fits the data")
    if fmt == PAIRS_FORMAT and m.get("seq_len") != seq_len:
        raise ValueError(f"{manifest_where(path)} has seq_len {m.get('seq_len')} but train.seq_len is "
                         f"{seq_len}: set train.seq_len={m.get('seq_len')} or re-run `dist-llm prepare pack=bert` "
                         f"with pack.seq_len={seq_len}")


def _load_source(path: str, weight: float, seq_len: int, require_checksums: bool = True,
                 fmt: str = FORMAT, fetch: Optional[FetchOptions] = None) -> _Source:
    m = read_split_manifest(path, fmt, fetch)
    check_checksums(path, m, require_checksums)
    if fmt != FORMAT:
        _check_format(path, m, fmt, seq_len)
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
    return _Source(
        path=str(path), weight=float(weight), manifest=m,
        files=[location(path, s["file"]) for s in shards], sha=[s.get("sha256") for s in shards],
        counts=np.array([s["num_samples"] for s in shards], dtype=np.int64), fingerprint=fp, first=first,
        names=[str(s["file"]) for s in shards],
    )


class _SourceStream:
    """Where the p-th sample a lane draws from one source lives: (epoch, shard, offset)."""

    def __init__(self, src: _Source, index: int, lanes: int, seed: int) -> None:
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


class _Stream:
    """All lanes of a blend; picklable so DataLoader workers can own a copy."""

    def __init__(self, sources: List[_Source], lanes: int, per_lane: int, seed: int,
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

    def _checked_rows(self, src: _Source, shard: int) -> np.ndarray:
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


class _LaneDataset(IterableDataset):
    """Worker ``w`` yields ``(step, w, its lanes' chunk)`` for every step from ``start``."""

    def __init__(self, stream: _Stream, worker_lanes: List[List[int]], start: int) -> None:
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


class TrainLoader:
    """Per-rank training batches: ``next_step()`` gives ``grad_accum`` micro-batches.

    The state dict is the same on every rank (it describes all lanes), holds only integers
    and strings, and resumes exactly, also with a different ``dp_size`` that divides ``lanes``.
    """

    def __init__(
        self,
        sources: List[Tuple[str, float]],
        seq_len: int,
        lanes: int,
        dp_rank: int,
        dp_size: int,
        micro_batch_size: int,
        grad_accum: int,
        seed: int,
        num_workers: int = 0,
        require_checksums: bool = True,
        bad_samples: str = "raise",
        max_bad_fraction: float = 0.0,
        fmt: str = FORMAT,
        decode: Optional[Decode] = None,
        fetch: Optional[FetchOptions] = None,
        window_offsets: str = PER_EPOCH,
    ) -> None:
        """``fmt``: the shard format the task reads; for record formats (BERT pairs, images)
        ``decode`` turns each micro-batch's sample dicts into the task's tensors. ``fetch``: how
        sources named by URL are read (retries, cache; :mod:`dist_llm.data.sources`).
        ``window_offsets``: per_epoch | fixed, see :mod:`dist_llm.data.windows` (causal data only)."""
        if not sources:
            raise ValueError("no training sources: set data.train to at least one shard directory")
        for name, v in (("data.lanes", lanes), ("dp_size", dp_size), ("micro_batch_size", micro_batch_size),
                        ("grad_accum", grad_accum), ("seq_len", seq_len)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        G = micro_batch_size * grad_accum * dp_size
        if lanes % dp_size:
            raise ValueError(f"data.lanes={lanes} is not divisible by the data-parallel size {dp_size}: "
                             f"every rank must own whole lanes; set data.lanes to a multiple of {dp_size}")
        if G % lanes:
            raise ValueError(f"global batch {G} (micro {micro_batch_size} x accum {grad_accum} x dp {dp_size}) "
                             f"is not divisible by data.lanes={lanes}; make train.global_batch_size a multiple "
                             f"of data.lanes or change data.lanes")
        if num_workers and lanes % (dp_size * num_workers):
            raise ValueError(f"data.lanes={lanes} is not divisible by dp_size*num_workers={dp_size}*{num_workers}: "
                             f"every worker must own whole lanes; change data.num_workers or data.lanes")
        if fmt != FORMAT and decode is None:
            raise ValueError(f"shard format {fmt!r} needs a decode function (the task's decode_batch)")
        srcs = [_load_source(str(p), float(w), seq_len, require_checksums, fmt, fetch) for p, w in sources]
        for s in srcs[1:]:
            for key in ("dtype", "vocab_size", "classes", "special_ids"):
                if s.manifest.get(key) != srcs[0].manifest.get(key):
                    raise ValueError(f"training sources disagree on {key}: {srcs[0].path} has "
                                     f"{srcs[0].manifest.get(key)!r}, {s.path} has {s.manifest.get(key)!r}; "
                                     f"blend only datasets prepared with the same tokenizer")
        self.seq_len, self.lanes, self.dp_rank, self.dp_size = seq_len, lanes, dp_rank, dp_size
        self.micro_batch_size, self.grad_accum, self.seed = micro_batch_size, grad_accum, seed
        self.num_workers, self.global_batch_size = num_workers, G
        self.per_lane = G // lanes
        self.vocab_size = int(srcs[0].manifest.get("vocab_size") or 0)
        self.manifest = srcs[0].manifest  # what a task's decode needs (special_ids, classes)
        self.decode = decode
        self.eos_id = srcs[0].manifest.get("eos_id")
        per_rank = lanes // dp_size
        self.my_lanes = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
        self._stream = _Stream(srcs, lanes, self.per_lane, seed, bad_samples, max_bad_fraction, fetch,
                               window_offsets)
        self._worker_counts: Dict[int, Tuple[int, int]] = {}
        self._steps = 0
        self._it: Optional[Iterator[Any]] = None

    @classmethod
    def from_config(cls, data: Any, train: Any, dp_rank: int, dp_size: int, grad_accum: int,
                    fmt: str = FORMAT, decode: Optional[Decode] = None) -> "TrainLoader":
        """Build from ``DataConfig``/``TrainConfig`` (duck-typed to keep this layer free of config)
        and the run plan's ``grad_accum``; the constructor checks the batch arithmetic."""
        return cls([(s.path, s.weight) for s in data.train], train.seq_len, data.lanes, dp_rank, dp_size,
                   train.micro_batch_size, grad_accum, data.seed, data.num_workers,
                   getattr(data, "require_checksums", True), getattr(data, "bad_samples", "raise"),
                   getattr(data, "max_bad_fraction", 0.0), fmt, decode, FetchOptions.from_config(data),
                   str(getattr(data, "window_offsets", PER_EPOCH)))

    @property
    def steps(self) -> int:
        return self._steps

    def _rank_samples(self) -> np.ndarray:
        if not self.num_workers:
            return np.concatenate([self._stream.lane_chunk(l, self._steps) for l in self.my_lanes])
        if self._it is None:
            k = len(self.my_lanes) // self.num_workers
            split = [self.my_lanes[w * k:(w + 1) * k] for w in range(self.num_workers)]
            ds = _LaneDataset(self._stream, split, self._steps)
            self._it = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                       persistent_workers=False))
        parts = []
        for w in range(self.num_workers):  # DataLoader returns workers' items round-robin
            step, wid, chunk, counts = next(self._it)
            self._worker_counts[wid] = counts
            if step != self._steps or wid != w:
                raise RuntimeError(f"data worker order broke: got step {step} of worker {wid}, "
                                   f"expected step {self._steps} of worker {w}")
            parts.append(chunk)
        if self._stream.records:
            return np.concatenate(parts)
        return torch.cat(parts).numpy()

    def data_metrics(self) -> Dict[str, int]:
        """This rank's bad-sample count (``data.bad_samples=skip``) and the samples in the shards it
        has read, each shard counted once: for the trainer's metrics."""
        if not self.num_workers:
            bad, read = self._stream.bad_count, sum(self._stream.read_by_shard.values())
        else:
            bad = sum(c[0] for c in self._worker_counts.values())
            read = sum(c[1] for c in self._worker_counts.values())
        return {"data/bad_samples": int(bad), "data/samples_read": int(read)}

    def next_step(self) -> List[Any]:
        """``grad_accum`` LongTensors ``[micro_batch_size, seq_len + 1]`` for this rank, or for
        record formats the task's decoded batch dicts."""
        if self._stream.records:
            rows = self._rank_samples()
            step, m = self._steps, self.micro_batch_size
            # global index within the step's global batch (lane-major): independent of dp
            first = self.my_lanes[0] * self.per_lane
            self._steps += 1
            return [self.decode(list(rows[i * m:(i + 1) * m]), step, list(range(first + i * m, first + (i + 1) * m)))
                    for i in range(self.grad_accum)]
        x = torch.from_numpy(np.ascontiguousarray(self._rank_samples(), dtype=np.int64))
        self._steps += 1
        m = self.micro_batch_size
        return [x[i * m:(i + 1) * m] for i in range(self.grad_accum)]

    def _layout(self) -> Dict[str, Any]:
        return {
            "lanes": self.lanes, "global_batch_size": self.global_batch_size, "seed": self.seed,
            "seq_len": self.seq_len, "window_offsets": self._stream.window_offsets,
            "sources": [{"path": s.path, "weight": s.weight, "fingerprint": s.fingerprint}
                        for s in self._stream.sources],
        }

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable; ``steps`` is the state, the rest checks compatibility or informs."""
        drawn = self._stream.blend.counts_before(self._steps * self.per_lane)
        lanes = []
        for l in range(self.lanes):
            row = []
            for s, st in enumerate(self._stream.streams):
                e, shard, off = st.locate(l, int(drawn[s]))
                row.append({"source": s, "drawn": int(drawn[s]), "epoch": e,
                            "shard": st.src.names[shard], "offset": off,
                            "window_offset": self._stream.offset(e, s)})
            lanes.append(row)
        return {"format": STATE_FORMAT, "steps": self._steps, "dp_size": self.dp_size,
                **self._layout(), "lane_positions": lanes}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue exactly where ``state`` left off; ValueError when the layout differs.

        A different ``dp_size`` is accepted: the global batch does not depend on it.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"data loader state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        now = self._layout()
        diffs = []
        for key in ("lanes", "global_batch_size", "seed", "seq_len"):
            if state.get(key) != now[key]:
                diffs.append(f"{key}: checkpoint {state.get(key)!r}, now {now[key]!r}")
        was = state.get("window_offsets", FIXED)  # states written before the setting read windows as stored
        if was != now["window_offsets"]:
            diffs.append(f"data.window_offsets: checkpoint {was!r}, now {now['window_offsets']!r} "
                         f"(set data.window_offsets={was} to continue this run)")
        old = state.get("sources", [])
        if len(old) != len(now["sources"]):
            diffs.append(f"number of sources: checkpoint {len(old)}, now {len(now['sources'])}")
        else:
            for i, (a, b) in enumerate(zip(old, now["sources"])):
                for key in ("weight", "fingerprint"):
                    if a.get(key) != b[key]:
                        diffs.append(f"source {i} ({b['path']}) {key}: checkpoint {a.get(key)!r}, now {b[key]!r}")
        if diffs:
            raise ValueError("cannot resume the data loader, the data layout changed: " + "; ".join(diffs)
                             + ". Restore the original data/train settings or start a fresh run")
        steps = state.get("steps")
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"data loader state has an invalid step count {steps!r}")
        self._steps = steps
        self._it = None  # recreated at the resumed step (workers restart there)

    def close(self) -> None:
        """Stop worker processes, if any."""
        self._it = None


class ValLoader:
    """The first ``num_samples`` samples of a split, in shard order, sliced contiguously per rank."""

    def __init__(self, split_dir: str, seq_len: int, dp_rank: int, dp_size: int,
                 micro_batch_size: int, num_samples: int, require_checksums: bool = True,
                 fmt: str = FORMAT, decode: Optional[Callable[[List[Dict[str, Any]], List[int]], Any]] = None,
                 fetch: Optional[FetchOptions] = None) -> None:
        """Record formats (``fmt`` BERT pairs / images) are decoded per micro-batch by ``decode``
        (the task's ``decode_eval_batch(samples, global indices)``); ``fetch`` as for TrainLoader."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        m = read_split_manifest(split_dir, fmt, fetch)
        check_checksums(split_dir, m, require_checksums)
        if fmt != FORMAT:
            if decode is None:
                raise ValueError(f"shard format {fmt!r} needs a decode function (the task's decode_eval_batch)")
            _check_format(split_dir, m, fmt, seq_len)
        elif m["sample_len"] != seq_len + 1:
            raise ValueError(f"{manifest_where(split_dir)} has seq_len {m['seq_len']} but "
                             f"train.seq_len is {seq_len}: re-run `dist-llm prepare` with seq_len={seq_len}")
        unit = dp_size * micro_batch_size
        n = min(int(num_samples), int(m["num_samples"])) // unit * unit
        if n <= 0:
            raise ValueError(f"validation set {split_dir} gives no full batch: {m['num_samples']} samples, "
                             f"{num_samples} requested, dp*micro_batch_size={unit}; prepare a larger val "
                             f"split or raise train.eval_batches")
        self.split_dir, self.manifest, self.num_samples = str(split_dir), m, n
        self.dp_rank, self.dp_size, self.micro_batch_size = dp_rank, dp_size, micro_batch_size
        self.fmt, self.decode, self.fetch = fmt, decode, fetch
        self._batches: Optional[List[Any]] = None

    def _record_batches(self, lo: int, hi: int) -> List[Any]:
        recs: List[Dict[str, Any]] = []
        seen = 0
        for sh in self.manifest["shards"]:
            n = sh["num_samples"]
            if seen >= hi:
                break
            if seen + n > lo and n:
                loc = location(self.split_dir, sh["file"])
                got = read_checked_records(loc, self.fmt, n, sha256=sh.get("sha256"),
                                           data=remote_bytes(loc, sh.get("sha256"), self.fetch))
                recs.extend(got[max(lo - seen, 0):hi - seen])
            seen += n
        m = self.micro_batch_size
        return [self.decode(recs[i:i + m], list(range(lo + i, lo + i + m))) for i in range(0, hi - lo, m)]

    def batches(self) -> List[Any]:
        """This rank's micro-batches ``[micro_batch_size, seq_len + 1]`` (or decoded batch dicts
        for record formats); the same every call."""
        if self._batches is None and self.fmt != FORMAT:
            per = self.num_samples // self.dp_size
            self._batches = self._record_batches(self.dp_rank * per, (self.dp_rank + 1) * per)
        if self._batches is None:
            per = self.num_samples // self.dp_size
            lo, hi = self.dp_rank * per, (self.dp_rank + 1) * per
            rows, seen = [], 0
            for sh in self.manifest["shards"]:
                if seen >= hi:
                    break
                n = sh["num_samples"]
                if seen + n > lo and n:
                    loc = location(self.split_dir, sh["file"])
                    arr = read_shard(loc, self.manifest["sample_len"], self.manifest["dtype"], sha256=sh.get("sha256"),
                                     first_index=seen, num_samples=n, data=remote_bytes(loc, sh.get("sha256"), self.fetch))
                    rows.append(arr[max(lo - seen, 0):hi - seen])
                seen += n
            x = torch.from_numpy(np.concatenate(rows).astype(np.int64))
            m = self.micro_batch_size
            self._batches = [x[i:i + m] for i in range(0, per, m)]
        return list(self._batches)
