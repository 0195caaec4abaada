"""Quality filters in the spirit of Gopher's rules; each rule has a name and a drop counter.

A document is dropped by the *first* rule that rejects it, in :attr:`QualityFilter.rules`
order, so the per-rule counts add up to the number of filtered documents. The n-gram rules run
on 64-bit word-hash arrays with NumPy (shared with MinHash), not on Python tuples, and for a
whole chunk at once (:meth:`QualityFilter.check_many`): one sort of every document's n-grams
per ``n``, instead of several small NumPy calls per document, whose fixed cost dominated.
:func:`top_ngram_fraction` / :func:`dup_ngram_fraction` are the one-document definitions the
batched code reproduces exactly (tests compare them).
"""
from __future__ import annotations

import re
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

_ALPHA = re.compile(r"[^\W\d_]+")
_P = np.uint64(0x100000001B3)
_MIX = np.uint64(0x9E3779B97F4A7C15)
# ASCII text takes a bytes.translate fast path; these are exactly what ``[^\W\d_]`` and
# ``str.split()`` treat as letters and whitespace below U+0080.
_ASCII_LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))
_ASCII_SPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


class WordTable(NamedTuple):
    """The words of many documents: lower-cased UTF-8 word hashes and byte lengths, concatenated;
    document ``d`` owns ``[starts[d], starts[d + 1])``."""

    hashes: np.ndarray  # uint64
    lens: np.ndarray  # int64
    starts: np.ndarray  # int64, len = documents + 1

    def take(self, docs: np.ndarray) -> "WordTable":
        """The table of a subset of documents (in the given order)."""
        lo, hi = self.starts[docs], self.starts[np.asarray(docs) + 1]
        n = hi - lo
        starts = np.zeros(len(n) + 1, np.int64)
        np.cumsum(n, out=starts[1:])
        pos = np.repeat(lo - starts[:-1], n) + np.arange(int(starts[-1]), dtype=np.int64)
        return WordTable(self.hashes[pos], self.lens[pos], starts)


def alpha_counts(text: str) -> Tuple[int, int]:
    """``(non-space characters, alphabetic characters)`` of ``text``."""
    if text.isascii():
        b = text.encode("ascii")
        return len(b.translate(None, _ASCII_SPACE)), len(b) - len(b.translate(None, _ASCII_LETTERS))
    return len("".join(text.split())), len("".join(_ALPHA.findall(text)))


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash of every run of ``n`` consecutive words (uint64, wrapping)."""
    m = len(word_hashes) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    for k in range(n):
        h = h * _P + word_hashes[k:k + m]
    return h


def top_ngram_fraction(word_hashes: np.ndarray, word_lens: np.ndarray, n: int) -> float:
    """Characters in the most frequent (repeated) n-gram over all word characters."""
    h = ngram_hashes(word_hashes, n)
    if len(h) == 0:
        return 0.0
    uniq, first, counts = np.unique(h, return_index=True, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < 2:
        return 0.0
    start = int(first[top])
    chars = int(word_lens[start:start + n].sum()) * int(counts[top])
    return chars / max(int(word_lens.sum()), 1)


def dup_ngram_fraction(word_hashes: np.ndarray, word_lens: np.ndarray, n: int) -> float:
    """Characters of words covered by any n-gram that occurs more than once (overlaps once)."""
    h = ngram_hashes(word_hashes, n)
    if len(h) == 0:
        return 0.0
    _, inv, counts = np.unique(h, return_inverse=True, return_counts=True)
    starts = np.nonzero(counts[inv] > 1)[0]
    if len(starts) == 0:
        return 0.0
    w = len(word_hashes)
    cover = np.cumsum(np.bincount(starts, minlength=w + 1) - np.bincount(starts + n, minlength=w + n + 1)[:w + 1])
    return int(word_lens[cover[:w] > 0].sum()) / max(int(word_lens.sum()), 1)


def _ngram_table(t: WordTable, n: int, cache: dict) -> np.ndarray:
    """:func:`ngram_hashes` over the whole table, built from the largest smaller ``n`` cached
    (``h_n[p] = h_{n-1}[p] * P + w[p + n - 1]``: the very same wrapping arithmetic)."""
    if n not in cache:
        k = max((m for m in cache if m < n), default=0)
        if k == 0:
            cache[n] = ngram_hashes(t.hashes, n)
        else:
            h = cache[k]
            for j in range(k, n):
                m = len(t.hashes) - j
                h = h[:m] * _P + t.hashes[j:j + m] if m > 0 else np.zeros(0, np.uint64)
            cache[n] = h
    return cache[n]


class _Grams:
    """Every document's repeated ``n``-grams, grouped by (document, hash): what
    :func:`top_ngram_fraction` and :func:`dup_ngram_fraction` compute, for all documents.

    A plain sort of one 64-bit key per n-gram finds the keys that occur more than once; only
    those n-grams (usually a small share) are then grouped exactly with their positions.
    """

    def __init__(self, t: WordTable, n: int, cache: Optional[dict] = None) -> None:
        D = len(t.starts) - 1
        self.n, self.t, self.D = n, t, D
        m = np.maximum(np.diff(t.starts) - n + 1, 0)
        moff = np.zeros(D + 1, np.int64)
        np.cumsum(m, out=moff[1:])
        T = int(moff[-1])
        doc = np.repeat(np.arange(D, dtype=np.int64), m)
        pos = np.repeat(t.starts[:-1] - moff[:-1], m) + np.arange(T, dtype=np.int64)  # first word of each n-gram
        hv = _ngram_table(t, n, {} if cache is None else cache)[pos] if T else np.zeros(0, np.uint64)
        # (doc, hash) as one key, bijective per document: a key seen once is a unique n-gram of its
        # document. Keys seen more than once are grouped exactly below (a clash of two documents'
        # keys, p ~ 2^-64, only costs the exact path).
        with np.errstate(over="ignore"):
            key = hv ^ (doc.astype(np.uint64) * _MIX)
        sk = np.sort(key)
        rk = sk[1:][sk[1:] == sk[:-1]]
        # Keep the n-grams whose key may repeat: a bitmap over the keys' top bits (a few false
        # positives are harmless: they form groups of one).
        bits = np.uint64(64 - min(max(int(len(rk)).bit_length() + 4, 8), 24))
        seen = np.zeros(1 << (64 - int(bits)), bool)
        seen[rk >> bits] = True
        sel = np.flatnonzero(seen[key >> bits])
        key, doc, hv, pos = key[sel], doc[sel], hv[sel], pos[sel]
        order = np.argsort(key)
        sk, sd = key[order], doc[order]
        S = len(key)
        new = np.ones(S, bool)
        if S > 1:
            new[1:] = sk[1:] != sk[:-1]
            if (~new[1:] & (sd[1:] != sd[:-1])).any():
                order = np.lexsort((hv, doc))
                sk, sd = hv[order], doc[order]
                new[1:] = (sk[1:] != sk[:-1]) | (sd[1:] != sd[:-1])
        self.order, self.pos, self.hv = order, pos, hv
        self.gidx = np.flatnonzero(new)
        self.counts = np.diff(np.append(self.gidx, S))
        self.gdoc = sd[self.gidx]
        cl = np.zeros(len(t.lens) + 1, np.int64)
        np.cumsum(t.lens, out=cl[1:])
        self.cl = cl
        self.total = np.maximum(cl[t.starts[1:]] - cl[t.starts[:-1]], 1)

    def top_fraction(self) -> np.ndarray:
        frac = np.zeros(self.D)
        counts, gdoc = self.counts, self.gdoc
        if not len(counts):
            return frac
        maxc = np.zeros(self.D, np.int64)
        np.maximum.at(maxc, gdoc, counts)
        cg = np.flatnonzero((counts >= 2) & (counts == maxc[gdoc]))
        if not len(cg):
            return frac
        # per document, the tied top n-gram with the smallest hash (np.unique's order) ...
        ghv = self.hv[self.order[self.gidx[cg]]]
        o = np.lexsort((ghv, gdoc[cg]))
        cd = gdoc[cg][o]
        head = np.r_[True, cd[1:] != cd[:-1]]
        sel, d = cg[o[head]], cd[head]
        # ... at its first place: the smallest position among the group's members
        size = counts[sel]
        off = np.zeros(len(sel) + 1, np.int64)
        np.cumsum(size, out=off[1:])
        members = self.order[np.repeat(self.gidx[sel] - off[:-1], size) + np.arange(int(off[-1]), dtype=np.int64)]
        start = np.minimum.reduceat(self.pos[members], off[:-1])
        frac[d] = (self.cl[start + self.n] - self.cl[start]) * size / self.total[d]
        return frac

    def dup_fraction(self) -> np.ndarray:
        t, W = self.t, len(self.t.lens)
        frac = np.zeros(self.D)
        if not len(self.counts):
            return frac
        rep = self.pos[self.order][np.repeat(self.counts > 1, self.counts)]
        if not len(rep):
            return frac
        cover = np.cumsum(np.bincount(rep, minlength=W + 1) - np.bincount(rep + self.n, minlength=W + 1))[:W] > 0
        cc = np.zeros(W + 1, np.int64)
        np.cumsum(t.lens * cover, out=cc[1:])
        return (cc[t.starts[1:]] - cc[t.starts[:-1]]) / self.total


class QualityFilter:
    """Built once per worker from a ``FilterConfig``; :meth:`check` returns the failing rule."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.enabled = bool(cfg.enabled)
        rules: List[str] = []
        if self.enabled:
            for name in ("min_chars", "max_chars", "min_words", "max_words"):
                if getattr(cfg, name):
                    rules.append(name)
            if cfg.min_alpha_fraction > 0:
                rules.append("alpha_fraction")
            if cfg.max_dup_line_fraction < 1.0:
                rules.append("dup_lines")
            rules += [f"top_{n}gram" for n in cfg.top_ngram_n]
            rules += [f"dup_{n}gram" for n in cfg.dup_ngram_n]
            if cfg.blocklist or cfg.blocklist_regex:
                rules.append("blocklist")
        self.rules = rules
        pats = [rf"\b{re.escape(w)}\b" for w in cfg.blocklist] + list(cfg.blocklist_regex)
        # One alternation, case-insensitive: a single scan of the text whatever the list length.
        self._block_rx = re.compile("|".join(f"(?:{r})" for r in pats), re.IGNORECASE) if pats else None

    def check(self, text: str, words: Sequence[bytes], word_hashes: np.ndarray) -> Optional[str]:
        """None when the document passes; else the name of the first rule that rejects it.

        ``words`` are the lower-cased UTF-8 words and ``word_hashes`` their hashes.
        """
        if not self.enabled:
            return None
        lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        table = WordTable(np.asarray(word_hashes, dtype=np.uint64), lens, np.array([0, len(words)], np.int64))
        return self.check_many([text], table)[0]

    def check_many(self, texts: Sequence[str], words: WordTable) -> List[Optional[str]]:
        """:meth:`check` for many documents at once; ``words`` holds their words in order."""
        out: List[Optional[str]] = [None] * len(texts)
        if not self.enabled:
            return out
        c = self.cfg
        nwords = np.diff(words.starts).tolist()
        todo: List[int] = []
        dup_lines = c.max_dup_line_fraction < 1.0
        for i, text in enumerate(texts):
            nchar, nword = len(text), nwords[i]
            if c.min_chars and nchar < c.min_chars:
                out[i] = "min_chars"
            elif c.max_chars and nchar > c.max_chars:
                out[i] = "max_chars"
            elif c.min_words and nword < c.min_words:
                out[i] = "min_words"
            elif c.max_words and nword > c.max_words:
                out[i] = "max_words"
            else:
                if c.min_alpha_fraction > 0:
                    nonspace, alpha = alpha_counts(text)
                    if nonspace == 0 or alpha / nonspace < c.min_alpha_fraction:
                        out[i] = "alpha_fraction"
                        continue
                if dup_lines:
                    lines = [ln for ln in map(str.strip, text.split("\n")) if ln]
                    if lines and 1.0 - len(set(lines)) / len(lines) > c.max_dup_line_fraction:
                        out[i] = "dup_lines"
                        continue
                todo.append(i)
        if todo and (c.top_ngram_n or c.dup_ngram_n):
            todo = self._ngram_rules(np.array(todo, np.int64), words, out)
        if self._block_rx is not None:
            for i in todo:
                if self._block_rx.search(texts[i]):
                    out[i] = "blocklist"
        return out

    def _ngram_rules(self, docs: np.ndarray, words: WordTable, out: List[Optional[str]]) -> List[int]:
        """Apply the n-gram rules to ``docs``; record failures in ``out``; return the passing ones."""
        c = self.cfg
        live = np.ones(len(docs), bool)
        t = words.take(docs)
        cache: dict = {}
        for n, lim in zip(c.top_ngram_n, c.top_ngram_max):
            if not live.any():
                break
            # all of ``docs`` (the rejected ones' values are ignored): shares n-gram hashes across n
            frac = _Grams(t, n, cache).top_fraction()
            for j in np.flatnonzero(live & (frac > lim)).tolist():
                out[int(docs[j])] = f"top_{n}gram"
                live[j] = False
        # Every repeated (n+1)-gram contains a repeated n-gram, so the duplicated share can only
        # shrink as n grows: once it is under every remaining limit, the larger n cannot fail.
        dup = sorted(zip(c.dup_ngram_n, c.dup_ngram_max))
        active = live.copy()
        for k, (n, lim) in enumerate(dup):
            idx = np.flatnonzero(active)
            if not len(idx):
                break
            whole = len(idx) == len(docs)
            frac = _Grams(t if whole else words.take(docs[idx]), n, cache if whole else None).dup_fraction()
            bad = frac > lim
            for j in idx[bad].tolist():
                out[int(docs[j])] = f"dup_{n}gram"
                live[j] = False
            active[idx[bad | (frac <= min(l for _, l in dup[k:]))]] = False
        return docs[live].tolist()
