"""Exact and near-duplicate detection: hashes in the workers, decisions in one ordered pass.

* Exact: 64-bit BLAKE2b of the lower-cased, whitespace-collapsed text.
* Near: MinHash over word shingles with banded LSH. Signatures are computed for a whole chunk
  at once in NumPy (permutations x shingle hashes, then ``np.minimum.reduceat`` per document
  along contiguous rows); ``bench/prepare_bench.py`` measures this against ``datasketch``'s
  ``MinHash.update_batch``. Permutations are multiply-add-shift hashes
  ``(a*h + b) mod 2^64 >> 32`` (a 2-universal family, Dietzfelbinger 1996): the same quality
  as datasketch's ``(a*h + b) mod (2^61-1)`` for MinHash, without a 64-bit modulo, which is
  most of NumPy's cost. The shift is monotone, so it is applied once to the minima, not to
  every cell; and a minimum over a document's shingles does not care whether they repeat, so
  the chunk path (:func:`chunk_shingles`) skips the per-document ``unique``.

Decisions need the documents in input order (the first copy is kept, later ones dropped), so
they run in one process over compact per-document keys, never over text: one exact key and
``bands`` LSH keys, 8 bytes each, in :class:`U64Set` open-addressing tables (~16 bytes per key).
That index is the only state that grows with the corpus; past a byte budget
(``memory_budget_mb``) its tables are spilled to sorted runs on disk (:class:`SpilledKeys`), so
the driver's memory stays bounded while the decisions stay exactly the same.
"""
from __future__ import annotations

import hashlib
import math
import zlib
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from dist_llm.prepare.filters import _P, WordTable, ngram_hashes

_MAX32 = np.uint64(0xFFFFFFFF)
_MIX = np.uint64(0x9E3779B97F4A7C15)

KEEP, EXACT_DUP, NEAR_DUP = 0, 1, 2


def words_and_hashes(text: str) -> Tuple[List[bytes], np.ndarray]:
    """Lower-cased UTF-8 words and their CRC32s (deterministic across processes, unlike ``hash``)."""
    words = text.lower().encode("utf-8", "surrogatepass").split()
    return words, np.array(list(map(zlib.crc32, words)), dtype=np.uint64)


def word_table(texts: Sequence[str]) -> WordTable:
    """:func:`words_and_hashes` of many documents as one :class:`WordTable`."""
    words: List[bytes] = []
    counts = np.zeros(len(texts) + 1, np.int64)
    for i, text in enumerate(texts):
        w = text.lower().encode("utf-8", "surrogatepass").split()
        words += w
        counts[i + 1] = len(w)
    return WordTable(np.fromiter(map(zlib.crc32, words), dtype=np.uint64, count=len(words)),
                     np.fromiter(map(len, words), dtype=np.int64, count=len(words)), np.cumsum(counts))


def exact_hash(text: str) -> int:
    norm = " ".join(text.lower().split()).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(norm, digest_size=8).digest(), "little")


def shingle_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """32-bit hashes of the distinct ``n``-word shingles; a short document is one shingle."""
    h = ngram_hashes(word_hashes, min(n, len(word_hashes))) if len(word_hashes) else np.zeros(1, np.uint64)
    return np.unique((h ^ (h >> np.uint64(32))) & _MAX32)


def chunk_shingles(t: WordTable, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Every document's shingle hashes (as :func:`shingle_hashes`, but repeats kept) concatenated,
    and each document's start: ``(values, starts)``, ``len(starts) = documents + 1``."""
    L = np.diff(t.starts)
    full = L >= n
    m = np.where(full, L - n + 1, 1)  # a document shorter than n words is one shingle
    starts = np.zeros(len(L) + 1, np.int64)
    np.cumsum(m, out=starts[1:])
    total = int(starts[-1])
    vals = np.zeros(total, np.uint64)
    if full.any():
        pos = np.repeat(t.starts[:-1] - starts[:-1], m) + np.arange(total, dtype=np.int64)
        slot = np.repeat(full, m)
        vals[slot] = ngram_hashes(t.hashes, n)[pos[slot]]
    short = np.flatnonzero(~full)
    if len(short):
        h = np.zeros(len(short), np.uint64)
        first, ls = t.starts[short], L[short]
        with np.errstate(over="ignore"):
            for k in range(int(ls.max(initial=0))):  # the one ngram_hashes(words, len(words)) value
                on = ls > k
                h[on] = h[on] * _P + t.hashes[first[on] + k]
        vals[starts[short]] = h
    return (vals ^ (vals >> np.uint64(32))) & _MAX32, starts


def lsh_params(threshold: float, num_perm: int) -> Tuple[int, int]:
    """``(bands, rows)`` minimising false-positive + false-negative area (datasketch's rule)."""
    xs = np.linspace(0.0, 1.0, 201)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        r = num_perm // b  # b * r <= num_perm: the last num_perm % b minima go unused
        p = 1.0 - (1.0 - xs ** r) ** b
        lo, hi = xs <= threshold, xs >= threshold
        err = np.trapezoid(p[lo], xs[lo]) + np.trapezoid(1.0 - p[hi], xs[hi])
        if err < best_err:
            best, best_err = (b, r), err
    return best


class MinHasher:
    """Batched MinHash signatures and LSH band keys."""

    def __init__(self, num_perm: int = 128, bands: int = 0, threshold: float = 0.8, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 1 << 64, size=num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)  # odd
        self.b = rng.integers(0, 1 << 64, size=num_perm, dtype=np.uint64, endpoint=False)
        self.num_perm = num_perm
        self.bands, self.rows = (bands, num_perm // bands) if bands else lsh_params(threshold, num_perm)

    def signatures(self, shingles: Sequence[np.ndarray], max_cells: int = 1 << 20) -> np.ndarray:
        """``[len(shingles), num_perm]`` uint64 minima; work is blocked to bound memory."""
        starts = np.zeros(len(shingles) + 1, np.int64)
        np.cumsum([len(s) for s in shingles], out=starts[1:])
        hv = np.concatenate(shingles) if len(shingles) else np.zeros(0, np.uint64)
        return self.signatures_flat(hv.astype(np.uint64, copy=False), starts, max_cells)

    def signatures_flat(self, hv: np.ndarray, starts: np.ndarray, max_cells: int = 1 << 20) -> np.ndarray:
        """Signatures of documents whose (non-empty) shingle lists are ``hv[starts[d]:starts[d+1]]``."""
        D, P = len(starts) - 1, self.num_perm
        out = np.empty((P, D), dtype=np.uint64)
        a, b = self.a[:, None], self.b[:, None]
        i = 0
        while i < D:  # documents [i, j): at most max_cells cells, at least one document
            j = int(np.searchsorted(starts, starts[i] + max(max_cells // P, 1), side="right")) - 1
            j = min(max(j, i + 1), D)
            lo, hi = int(starts[i]), int(starts[j])
            with np.errstate(over="ignore"):
                cells = hv[None, lo:hi] * a  # (a*h + b) mod 2^64; the >> 32 is applied to the minima
                cells += b
            out[:, i:j] = np.minimum.reduceat(cells, starts[i:j] - lo, axis=1)
            i = j
        out >>= np.uint64(32)
        return np.ascontiguousarray(out.T)

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """``[n, bands]`` uint64 keys; the band index is mixed in so one table serves all bands."""
        n = sig.shape[0]
        s = sig[:, : self.bands * self.rows].reshape(n, self.bands, self.rows)
        h = np.zeros((n, self.bands), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(self.rows):
                h = h * np.uint64(0x100000001B3) + s[:, :, k]
            h ^= (np.arange(self.bands, dtype=np.uint64) + np.uint64(1)) * _MIX
        return h


class U64Set:
    """A growable open-addressing set of uint64 keys with vectorised lookup and insert."""

    def __init__(self, capacity: int = 1 << 12) -> None:
        cap = 1 << max(4, int(math.ceil(math.log2(max(capacity, 16)))))
        self._table = np.zeros(cap, dtype=np.uint64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return self._table.nbytes

    def keys(self) -> np.ndarray:
        return self._table[self._table != 0]

    @staticmethod
    def _fix(keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.uint64)
        return np.where(keys == 0, np.uint64(1), keys)  # 0 marks an empty slot

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((keys * _MIX) >> np.uint64(64 - int(math.log2(len(self._table))))).astype(np.int64)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        keys = self._fix(keys)
        found = np.zeros(len(keys), dtype=bool)
        idx, todo = self._slots(keys), np.arange(len(keys))
        mask = len(self._table) - 1
        while len(todo):
            slot = self._table[idx]
            hit = slot == keys[todo]
            found[todo[hit]] = True
            go = ~hit & (slot != 0)
            todo, idx = todo[go], (idx[go] + 1) & mask
        return found

    def add(self, keys: np.ndarray) -> None:
        """Insert keys (duplicates and present keys are fine)."""
        keys = np.unique(self._fix(keys))
        keys = keys[~self.contains(keys)]
        if (self._n + len(keys)) * 2 > len(self._table):
            old = self._table[self._table != 0]
            self._table = np.zeros(1 << int(math.ceil(math.log2((self._n + len(keys)) * 4 + 16))), np.uint64)
            self._n = 0
            self._insert(old)
        self._insert(keys)

    def _insert(self, keys: np.ndarray) -> None:
        mask = len(self._table) - 1
        idx = self._slots(keys)
        while len(keys):
            free = self._table[idx] == 0
            cand = np.nonzero(free)[0]
            _, first = np.unique(idx[cand], return_index=True)  # one winner per empty slot
            win = cand[first]
            self._table[idx[win]] = keys[win]
            self._n += len(win)
            lose = np.ones(len(keys), dtype=bool)
            lose[win] = False
            keys, idx = keys[lose], (idx[lose] + 1) & mask


class SpilledKeys:
    """Sorted runs of uint64 keys on disk (``<dir>/run-<k>.u64``), queried by streaming them.

    Why streaming and not a memory map: pages of a mapped file count in the process' RSS once
    touched, and random lookups touch all of them; ``np.fromfile`` blocks only pass through the
    page cache. A query batch is sorted once and matched against every run's blocks with
    ``searchsorted``, so a batch costs one sequential read of what was spilled (a part of 2000
    documents against 10M spilled keys: ~80 MB from the page cache, tens of milliseconds).
    """

    BLOCK = 1 << 18  # keys per read: 2 MB

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.runs: List[Path] = []
        self.keys = 0

    def write_run(self, keys: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"run-{len(self.runs):05d}.u64"
        np.sort(keys.astype(np.uint64, copy=False)).tofile(path)
        self.runs.append(path)
        self.keys += len(keys)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(len(keys), dtype=bool)
        if not self.runs or not len(keys):
            return found
        order = np.argsort(keys, kind="stable")
        q = keys[order]
        hit = np.zeros(len(q), dtype=bool)
        for path in self.runs:
            with open(path, "rb") as f:
                while True:
                    block = np.fromfile(f, dtype=np.uint64, count=self.BLOCK)
                    if not len(block):
                        break
                    lo = int(np.searchsorted(q, block[0], side="left"))
                    hi = int(np.searchsorted(q, block[-1], side="right"))
                    if hi > lo:  # only the queries inside this block's key range
                        sub = q[lo:hi]
                        i = np.minimum(np.searchsorted(block, sub), len(block) - 1)
                        hit[lo:hi] |= block[i] == sub
        found[order] = hit
        return found


class SpillingU64Set:
    """A :class:`U64Set` that moves its keys to a new on-disk run (:class:`SpilledKeys`) whenever
    its table would exceed ``budget_bytes`` (0 = never): the same answers, bounded memory."""

    def __init__(self, spill_dir: Optional[Path], budget_bytes: int) -> None:
        self.mem = U64Set()
        self.budget = budget_bytes if spill_dir is not None else 0
        self.disk = SpilledKeys(spill_dir) if spill_dir is not None else None

    def __len__(self) -> int:
        return len(self.mem) + (self.disk.keys if self.disk is not None else 0)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        found = self.mem.contains(keys)
        if self.disk is not None and self.disk.runs and not found.all():
            todo = np.flatnonzero(~found)
            found[todo] = self.disk.contains(U64Set._fix(keys[todo]))
        return found

    def add(self, keys: np.ndarray) -> None:
        """Insert keys that are not present yet (the caller checked with :meth:`contains`)."""
        # Spill before a resize could pass the budget: a table holds up to 64 bytes per key
        # (it grows to 4-8 slots per key once half full).
        if self.budget and len(self.mem) and (len(self.mem) + len(keys)) * 64 > self.budget:
            assert self.disk is not None
            self.disk.write_run(self.mem.keys())
            self.mem = U64Set()
        self.mem.add(keys)


class Deduper:
    """Ordered decisions: the first copy is kept; later exact or near copies are dropped.

    ``spill_dir`` and ``budget_bytes``: past that many bytes of hash tables, keys go to sorted
    runs under ``spill_dir`` (emptied first: the index is rebuilt from the parts on every run).
    """

    def __init__(self, exact: bool, near: bool, spill_dir: Optional[Path] = None, budget_bytes: int = 0) -> None:
        self.exact, self.near = exact, near
        if spill_dir is not None and spill_dir.exists():
            for old in spill_dir.rglob("run-*.u64"):
                old.unlink()
        # The LSH table holds `bands` keys per document, the exact one 1: share the budget alike.
        sub = (lambda name: spill_dir / name) if spill_dir is not None else (lambda name: None)
        self.exact_seen = SpillingU64Set(sub("exact"), budget_bytes // 8)
        self.lsh = SpillingU64Set(sub("lsh"), budget_bytes - budget_bytes // 8)

    def decide(self, exact: np.ndarray, bands: np.ndarray) -> np.ndarray:
        """Codes (KEEP / EXACT_DUP / NEAR_DUP) for a batch of candidates in input order."""
        n = len(exact)
        codes = np.zeros(n, dtype=np.int8)
        if n == 0 or not (self.exact or self.near):
            return codes
        ex_old = self.exact_seen.contains(exact) if self.exact else np.zeros(n, bool)
        nb_old = self.lsh.contains(bands.reshape(-1)).reshape(bands.shape).any(axis=1) if self.near \
            else np.zeros(n, bool)
        seen_ex: set = set()
        seen_b: set = set()
        keep_rows: List[int] = []
        ex_list, band_list = exact.tolist(), bands.tolist() if self.near else None
        for i in range(n):
            if self.exact and (ex_old[i] or ex_list[i] in seen_ex):
                codes[i] = EXACT_DUP
                continue
            if self.near:
                bk = band_list[i]  # type: ignore[index]
                if nb_old[i] or not seen_b.isdisjoint(bk):
                    codes[i] = NEAR_DUP
                    continue
                seen_b.update(bk)
            seen_ex.add(ex_list[i])
            keep_rows.append(i)
        if self.exact:
            self.exact_seen.add(exact[keep_rows])
        if self.near:
            self.lsh.add(bands[keep_rows].reshape(-1))
        return codes
