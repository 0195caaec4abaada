"""Phase B of the pipeline (ordered dedup + split plan) and what phase C reads it with.

Phase B reads only the parts' small metadata, in input order, and decides per document:
malformed / filtered / exact dup / near dup / kept-in-train / kept-in-val (:class:`Decider`).
Once the kept documents are tokenized (phase A2), it stores, per split, where every kept
document's tokens live (:func:`layout`), so phase C can build any shard independently
(:class:`ShardSource` reads them back; the packers in :mod:`dist_llm.prepare.packers` cut the
shards): shard ``s`` of a causal split holds windows ``[s*S, (s+1)*S)`` of the EOS-joined token
stream, whatever process writes it. That is what makes the writes parallel, resumable and identical.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from dist_llm.prepare.dedup import EXACT_DUP, NEAR_DUP, Deduper
from dist_llm.prepare.process import CANDIDATE, FILTERED0, load_part

SPLITS = ("train", "val")
MAX_EXAMPLES = 100


class BadInputError(ValueError):
    """Too much malformed input (``input.max_bad_fraction``) or inconsistent images."""


@dataclass
class Stats:
    records: int = 0
    bytes: int = 0
    malformed: int = 0
    malformed_examples: List[str] = field(default_factory=list)
    filtered: Counter = field(default_factory=Counter)
    exact_dups: int = 0
    near_dups: int = 0
    kept: Dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})

    def as_dict(self) -> Dict[str, Any]:
        cands = sum(self.kept.values()) + self.exact_dups + self.near_dups
        return {
            "records": self.records, "input_bytes": self.bytes, "malformed": self.malformed,
            "malformed_examples": self.malformed_examples,
            "bad_fraction": self.malformed / max(self.records, 1),
            "dropped": {"filters": dict(sorted(self.filtered.items())), "exact_dups": self.exact_dups,
                        "near_dups": self.near_dups},
            "dedup_rate": (self.exact_dups + self.near_dups) / max(cands, 1),
            "documents": dict(self.kept),
        }


def _val_mask(exact: np.ndarray, seq: np.ndarray, val_fraction: float, val_every: int) -> np.ndarray:
    if val_every:
        return seq % val_every == 0
    with np.errstate(over="ignore"):
        u = ((exact * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < val_fraction


@dataclass
class Decision:
    """Phase B's verdict on one part: which candidates it keeps and which of those go to val."""

    keep: np.ndarray  # indices among the part's candidates (status == CANDIDATE), ascending
    is_val: np.ndarray  # bool per kept candidate


class Decider:
    """Phase B, first half, one part at a time in input order: stats, ordered exact/near dedup
    and the split, from metadata only (so it can run while later parts are still processed)."""

    def __init__(self, cfg: Any, work: Path) -> None:
        self.cfg, self.work = cfg, work
        self.st = Stats()
        budget = int(cfg.memory_budget_mb * 2**20)
        self.dd = Deduper(cfg.dedup.exact, cfg.dedup.near and cfg.pack.kind != "image",
                          work / "dedup" if budget else None, budget * 3 // 4)  # 1/4 left for the plan

    def add(self, name: str) -> Decision:
        cfg, st = self.cfg, self.st
        m = load_part(self.work, name)
        n = len(m["status"])
        seq = np.arange(st.records, st.records + n)
        st.records += n
        st.bytes += int(m["nbytes"].sum())
        st.malformed += len(m["malformed"])
        for path, line, why in m["malformed"]:
            if len(st.malformed_examples) < MAX_EXAMPLES:
                st.malformed_examples.append(f"{path}:{line}: {why}")
        for code, cnt in zip(*np.unique(m["status"][m["status"] >= FILTERED0], return_counts=True)):
            st.filtered[m["rules"][int(code) - FILTERED0]] += int(cnt)
        cand = np.nonzero(m["status"] == CANDIDATE)[0]
        codes = self.dd.decide(m["exact"][cand], m["bands"][cand]) if cfg.pack.kind != "image" or cfg.dedup.exact \
            else np.zeros(len(cand), np.int8)
        st.exact_dups += int((codes == EXACT_DUP).sum())
        st.near_dups += int((codes == NEAR_DUP).sum())
        keep = np.flatnonzero(codes == 0)
        rows = cand[keep]
        is_val = _val_mask(m["exact"][rows], seq[rows], cfg.split.val_fraction, cfg.split.val_every)
        st.kept["train"] += int((~is_val).sum())
        st.kept["val"] += int(is_val.sum())
        return Decision(keep, is_val)

    def finish(self) -> Stats:
        """The stats; raises :class:`BadInputError` when too much input was malformed."""
        st, cfg = self.st, self.cfg
        if st.records and st.malformed / st.records > cfg.input.max_bad_fraction:
            shown = "\n".join(f"    {e}" for e in st.malformed_examples[:20])
            raise BadInputError(
                f"{st.malformed} of {st.records} input records are malformed ({st.malformed / st.records:.1%} > "
                f"input.max_bad_fraction={cfg.input.max_bad_fraction}); first ones:\n{shown}\nfix or remove "
                f"these inputs, or raise input.max_bad_fraction to accept the loss")
        return st


class _Columns:
    """The plan's per-document columns, appended part by part: in memory, or (past the budget)
    streamed to ``<work>/plan/<split>.<column>.bin`` and memory-mapped back read-only, so neither
    the driver nor the writers hold the whole plan (they touch only the pages they read)."""

    def __init__(self, dir: Optional[Path]) -> None:
        self.dir = dir
        self.mem: Dict[str, Dict[str, List[np.ndarray]]] = {s: {} for s in SPLITS}
        self.files: Dict[Tuple[str, str], Any] = {}
        self.meta: Dict[Tuple[str, str], Tuple[np.dtype, tuple, int]] = {}
        if dir is not None:
            dir.mkdir(parents=True, exist_ok=True)

    def append(self, split: str, col: str, a: np.ndarray) -> None:
        if self.dir is None:
            self.mem[split].setdefault(col, []).append(a)
            return
        key = (split, col)
        if key not in self.files:
            self.files[key] = open(self.dir / f"{split}.{col}.bin", "wb")
            self.meta[key] = (a.dtype, a.shape[1:], 0)
        dt, trail, n = self.meta[key]
        np.ascontiguousarray(a, dtype=dt).tofile(self.files[key])
        self.meta[key] = (dt, trail, n + len(a))

    def finish(self) -> Dict[str, Dict[str, np.ndarray]]:
        if self.dir is None:
            return {s: {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in c.items()}
                    for s, c in self.mem.items()}
        out: Dict[str, Dict[str, np.ndarray]] = {s: {} for s in SPLITS}
        for (split, col), f in self.files.items():
            f.close()
            dt, trail, n = self.meta[(split, col)]
            out[split][col] = (np.memmap(self.dir / f"{split}.{col}.bin", dtype=dt, mode="r", shape=(n, *trail))
                               if n else np.zeros((0, *trail), dt))
        return out


def plan_spills(cfg: Any, decisions: List[Decision]) -> bool:
    """Whether the plan (~48 bytes per kept document at most) passes a quarter of the budget."""
    budget = cfg.memory_budget_mb * 2**20
    return bool(budget) and sum(len(d.keep) for d in decisions) * 48 > budget / 4


def layout(cfg: Any, work: Path, parts: List[str], decisions: List[Decision]) -> Dict[str, Dict[str, np.ndarray]]:
    """Phase B, second half (text: after phase A2 tokenized the kept documents): per split, where
    every kept document's tokens (or pixels) live, in input order (on disk past the budget)."""
    cols = _Columns(work / "plan" if plan_spills(cfg, decisions) else None)
    image = cfg.pack.kind == "image"
    for pi, (name, dec) in enumerate(zip(parts, decisions)):
        if image:  # pixels of every candidate are in the part, in candidate order
            m = load_part(work, name)
            cand = np.nonzero(m["status"] == CANDIDATE)[0]
            offs = np.concatenate([[0], np.cumsum(m["ntok"][cand])])[:-1][dec.keep]
            rows = cand[dec.keep]
            ntok = m["ntok"][rows]
            nsent = sent_start = labels = None
        else:  # tokens of the kept documents only, in order
            with np.load(work / "parts" / f"{name}.tok.npz") as z:
                t = {k: z[k] for k in z.files}
            ntok = t["ntok"]
            offs = np.concatenate([[0], np.cumsum(ntok)])[:-1]
            nsent = t.get("nsent")
            labels = t.get("label")  # pack=classify: the kept rows' label strings
            sent_start = np.concatenate([[0], np.cumsum(nsent)])[:-1] if nsent is not None else None
        for split, sel in (("train", ~dec.is_val), ("val", dec.is_val)):
            k = int(sel.sum())
            cols.append(split, "part", np.full(k, pi, np.int64))
            cols.append(split, "off", offs[sel])
            cols.append(split, "ntok", ntok[sel])
            if sent_start is not None:
                cols.append(split, "sent_start", sent_start[sel])
                cols.append(split, "nsent", nsent[sel])
            if not image and labels is not None:
                cols.append(split, "label", labels[sel])
            if image:
                cols.append(split, "shape", m["shape"][rows[sel]])
                cols.append(split, "label", m["label"][rows[sel]])
                cols.append(split, "fidx", m["fidx"][rows[sel]])
    return cols.finish()


# ---- what phase C reads ----------------------------------------------------------------------

@dataclass
class ShardJob:
    split: str
    index: int
    lo: int  # causal: first window; bert/image: first document
    hi: int


def doc_jobs(split: str, docs: Dict[str, np.ndarray], per_shard: int, per_doc_samples: np.ndarray) -> List[ShardJob]:
    """Consecutive documents per shard until about ``per_shard`` samples (BERT, images)."""
    jobs, lo, acc = [], 0, 0
    for d, k in enumerate(per_doc_samples.tolist()):
        acc += k
        if acc >= per_shard:
            jobs.append(ShardJob(split, len(jobs), lo, d + 1))
            lo, acc = d + 1, 0
    if lo < len(per_doc_samples):
        jobs.append(ShardJob(split, len(jobs), lo, len(per_doc_samples)))
    return jobs


class ShardSource:
    """Reads the plan's documents (tokens, sentences, pixels) back from the part files, for the
    packers; caches memory-mapped part files per process. Picklable (sent to every writer)."""

    def __init__(self, work: Path, parts: List[str], docs: Dict[str, Dict[str, np.ndarray]], out_dir: Path) -> None:
        self.work, self.parts, self.docs, self.out = work, parts, docs, out_dir
        self._mm: Dict[Tuple[int, str], np.ndarray] = {}
        self._sent: Dict[int, np.ndarray] = {}

    def array(self, part: int, kind: str) -> np.ndarray:
        """``<part>.<kind>.npy`` (tokens, images) memory-mapped."""
        key = (part, kind)
        if key not in self._mm:
            if len(self._mm) > 64:
                self._mm.clear()
            self._mm[key] = np.load(self.work / "parts" / f"{self.parts[part]}.{kind}.npy", mmap_mode="r")
        return self._mm[key]

    def doc_tokens(self, split: str, d: int) -> np.ndarray:
        D = self.docs[split]
        o = int(D["off"][d])
        return np.asarray(self.array(int(D["part"][d]), "tokens")[o:o + int(D["ntok"][d])])

    def sentences(self, split: str, d: int) -> List[np.ndarray]:
        D = self.docs[split]
        p = int(D["part"][d])
        if p not in self._sent:
            if len(self._sent) > 64:
                self._sent.clear()
            with np.load(self.work / "parts" / f"{self.parts[p]}.tok.npz") as z:
                self._sent[p] = z["sent_len"]
        lens = self._sent[p][int(D["sent_start"][d]): int(D["sent_start"][d]) + int(D["nsent"][d])]
        toks = self.doc_tokens(split, d)
        return np.split(toks, np.cumsum(lens)[:-1]) if len(lens) else [toks]
