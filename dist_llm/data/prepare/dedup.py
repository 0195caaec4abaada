"""Exact and near-duplicate detection: hashes in the workers, decisions in one ordered pass.

* Exact: 64-bit BLAKE2b of the lower-cased, whitespace-collapsed text.
* Near: MinHash over word shingles with banded LSH. Signatures are computed for a whole chunk
  at once in NumPy (shingle hashes x permutations, then ``np.minimum.reduceat`` per document);
  ``bench/prepare_bench.py`` measures this against ``datasketch``'s ``MinHash.update_batch``.
  Permutations are multiply-add-shift hashes ``(a*h + b) mod 2^64 >> 32`` (a 2-universal
  family, Dietzfelbinger 1996): the same quality as datasketch's ``(a*h + b) mod (2^61-1)`` for
  MinHash, without a 64-bit modulo, which is most of NumPy's cost.

Decisions need the documents in input order (the first copy is kept, later ones dropped), so
they run in one process over compact per-document keys, never over text: one exact key and
``bands`` LSH keys, 8 bytes each, in :class:`U64Set` open-addressing tables (~16 bytes per key).
That index is the only state that grows with the corpus.
"""
from __future__ import annotations

import hashlib
import math
import zlib
from typing import List, Sequence, Tuple

import numpy as np

from dist_llm.data.prepare.filters import ngram_hashes

_MAX32 = np.uint64(0xFFFFFFFF)
_MIX = np.uint64(0x9E3779B97F4A7C15)

KEEP, EXACT_DUP, NEAR_DUP = 0, 1, 2


def words_and_hashes(text: str) -> Tuple[List[bytes], np.ndarray]:
    """Lower-cased UTF-8 words and their CRC32s (deterministic across processes, unlike ``hash``)."""
    words = text.lower().encode("utf-8", "surrogatepass").split()
    return words, np.array(list(map(zlib.crc32, words)), dtype=np.uint64)


def exact_hash(text: str) -> int:
    norm = " ".join(text.lower().split()).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(norm, digest_size=8).digest(), "little")


def shingle_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """32-bit hashes of the distinct ``n``-word shingles; a short document is one shingle."""
    h = ngram_hashes(word_hashes, min(n, len(word_hashes))) if len(word_hashes) else np.zeros(1, np.uint64)
    return np.unique((h ^ (h >> np.uint64(32))) & _MAX32)


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

    def signatures(self, shingles: Sequence[np.ndarray], max_cells: int = 4_000_000) -> np.ndarray:
        """``[len(shingles), num_perm]`` uint64 minima; work is blocked to bound memory."""
        out = np.empty((len(shingles), self.num_perm), dtype=np.uint64)
        i = 0
        while i < len(shingles):
            j, cells = i, 0
            while j < len(shingles) and (j == i or cells + len(shingles[j]) * self.num_perm <= max_cells):
                cells += len(shingles[j]) * self.num_perm
                j += 1
            hv = np.concatenate(shingles[i:j])
            starts = np.cumsum([0] + [len(s) for s in shingles[i:j - 1]])
            with np.errstate(over="ignore"):
                phv = (hv[:, None] * self.a + self.b) >> np.uint64(32)
            out[i:j] = np.minimum.reduceat(phv, starts, axis=0)
            i = j
        return out

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
        return int(self._table.nbytes)

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


class Deduper:
    """Ordered decisions: the first copy is kept; later exact or near copies are dropped."""

    def __init__(self, exact: bool, near: bool) -> None:
        self.exact, self.near = exact, near
        self.exact_seen, self.lsh = U64Set(), U64Set()

    @property
    def index_bytes(self) -> int:
        return self.exact_seen.nbytes + self.lsh.nbytes

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
