"""Deterministic, stateful, resumable loading of token shards with the "lane" design.

:class:`TrainLoader` gives each rank its share of every global batch and a state dict that
resumes exactly (also on a different data-parallel size); :class:`ValLoader` gives the first
samples of a split, sliced per rank. Why lanes, and how shards are ordered and blended, is told
in :mod:`dist_llm.data.lanes`, which holds the streams themselves.

This module imports torch's DataLoader but nothing distributed: ranks arrive as plain ints.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from dist_llm.data.lanes import Decode, LaneDataset, LaneStream, Source, check_format, load_source
from dist_llm.data.shard_scan import read_checked_records, read_shard
from dist_llm.data.shards import FORMAT, check_checksums, manifest_where
from dist_llm.data.sources import FetchOptions, location, read_split_manifest, remote_bytes
from dist_llm.data.windows import FIXED, PER_EPOCH

__all__ = ["TrainLoader", "ValLoader"]

STATE_FORMAT = "dist-llm-loader/1"


def _check_batch_layout(seq_len: int, lanes: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                        grad_accum: int, num_workers: int) -> int:
    """The global batch ``micro * accum * dp``, after checking that every rank (and every worker)
    owns whole lanes and every lane gives the same number of samples per step."""
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
    return G


def _check_sources_agree(srcs: List[Source]) -> None:
    """Blended sources must share a tokenizer (and classes, for labelled data)."""
    for s in srcs[1:]:
        for key in ("dtype", "vocab_size", "classes", "special_ids"):
            if s.manifest.get(key) != srcs[0].manifest.get(key):
                raise ValueError(f"training sources disagree on {key}: {srcs[0].path} has "
                                 f"{srcs[0].manifest.get(key)!r}, {s.path} has {s.manifest.get(key)!r}; "
                                 f"blend only datasets prepared with the same tokenizer")


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
        G = _check_batch_layout(seq_len, lanes, dp_rank, dp_size, micro_batch_size, grad_accum, num_workers)
        if fmt != FORMAT and decode is None:
            raise ValueError(f"shard format {fmt!r} needs a decode function (the task's decode_batch)")
        srcs = [load_source(str(p), float(w), seq_len, require_checksums, fmt, fetch) for p, w in sources]
        _check_sources_agree(srcs)
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
        self._stream = LaneStream(srcs, lanes, self.per_lane, seed, bad_samples, max_bad_fraction, fetch,
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
            ds = LaneDataset(self._stream, split, self._steps)
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
            check_format(split_dir, m, fmt, seq_len)
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
