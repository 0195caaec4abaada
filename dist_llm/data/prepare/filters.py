"""Quality filters in the spirit of Gopher's rules; each rule has a name and a drop counter.

A document is dropped by the *first* rule that rejects it, in :attr:`QualityFilter.rules`
order, so the per-rule counts add up to the number of filtered documents. The n-gram rules run
on 64-bit word-hash arrays with NumPy (shared with MinHash), not on Python tuples: they are the
expensive part of filtering and this keeps them a few microseconds per document.
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence

import numpy as np

_ALPHA = re.compile(r"[^\W\d_]+")
_P = np.uint64(0x100000001B3)


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
        c = self.cfg
        nchar, nword = len(text), len(words)
        if c.min_chars and nchar < c.min_chars:
            return "min_chars"
        if c.max_chars and nchar > c.max_chars:
            return "max_chars"
        if c.min_words and nword < c.min_words:
            return "min_words"
        if c.max_words and nword > c.max_words:
            return "max_words"
        if c.min_alpha_fraction > 0:
            nonspace = sum(len(w) for w in text.split())
            alpha = sum(len(m) for m in _ALPHA.findall(text))
            if nonspace == 0 or alpha / nonspace < c.min_alpha_fraction:
                return "alpha_fraction"
        if c.max_dup_line_fraction < 1.0:
            lines = [ln.strip() for ln in text.split("\n")]
            lines = [ln for ln in lines if ln]
            if lines and 1.0 - len(set(lines)) / len(lines) > c.max_dup_line_fraction:
                return "dup_lines"
        if c.top_ngram_n or c.dup_ngram_n:
            lens = np.array(list(map(len, words)), dtype=np.int64)
            for n, lim in zip(c.top_ngram_n, c.top_ngram_max):
                if top_ngram_fraction(word_hashes, lens, n) > lim:
                    return f"top_{n}gram"
            # Every repeated (n+1)-gram contains a repeated n-gram, so the duplicated share can only
            # shrink as n grows: once it is under every remaining limit, the larger n cannot fail.
            dup = sorted(zip(c.dup_ngram_n, c.dup_ngram_max))
            for k, (n, lim) in enumerate(dup):
                frac = dup_ngram_fraction(word_hashes, lens, n)
                if frac > lim:
                    return f"dup_{n}gram"
                if frac <= min(l for _, l in dup[k:]):
                    break
        if self._block_rx is not None and self._block_rx.search(text):
            return "blocklist"
        return None
