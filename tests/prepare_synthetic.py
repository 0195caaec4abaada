"""A generated corpus with planted exact duplicates, near duplicates and junk.

Why: the tests and ``bench/prepare_bench.py`` need text whose right answer is known: how many
documents each filter and each dedup stage must drop. Words are random pseudo-words, so two
unrelated documents share almost no 5-word shingles, while a planted near duplicate (a few
words replaced) keeps a Jaccard similarity of about 0.9.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np

# Filters under which normal documents pass and each kind of junk fails exactly one known rule.
TEST_FILTER = {"min_words": 20, "min_alpha_fraction": 0.6, "max_dup_line_fraction": 0.3}


@dataclass
class Planted:
    docs: List[str] = field(default_factory=list)
    counts: Dict[str, int] = field(default_factory=dict)


def _vocab(rng: np.random.Generator, n: int = 5000) -> List[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, size=int(rng.integers(3, 10)))) for _ in range(n)]


def _doc(rng: np.random.Generator, vocab: List[str], lo: int, hi: int) -> List[str]:
    return [vocab[i] for i in rng.integers(0, len(vocab), size=int(rng.integers(lo, hi)))]


def _render(words: List[str]) -> str:
    lines, k = [], 0
    while k < len(words):
        lines.append(" ".join(words[k:k + 12]) + ".")
        k += 12
    return "\n".join(lines)


def planted_corpus(n_docs: int = 600, seed: int = 0, exact: float = 0.08, near: float = 0.08,
                   junk: float = 0.03, words: tuple = (200, 300)) -> Planted:
    """``n_docs`` originals plus planted copies and junk, shuffled deterministically."""
    rng = np.random.default_rng(seed)
    vocab = _vocab(rng)
    originals = [_doc(rng, vocab, *words) for _ in range(n_docs)]
    items: List[tuple] = [(i, _render(w)) for i, w in enumerate(originals)]
    n_exact, n_near, n_junk = int(n_docs * exact), int(n_docs * near), int(n_docs * junk)
    src = rng.permutation(n_docs)
    for j in range(n_exact):  # same words; whitespace and case changes must not hide it
        w = originals[src[j]]
        text = _render(w) if j % 2 else _render(w).replace(" ", "  ").upper()
        items.append((n_docs + j, text))
    for j in range(n_near):  # 2 words replaced: Jaccard of 5-word shingles >= 0.9
        w = list(originals[src[n_exact + j]])
        for pos in rng.choice(len(w), size=2, replace=False):
            w[pos] = vocab[int(rng.integers(0, len(vocab)))] + "x"
        items.append((n_docs + n_exact + j, _render(w)))
    junk_docs = []
    for j in range(n_junk):
        line = " ".join(_doc(rng, vocab, 10, 11)) + "."
        junk_docs.append("\n".join([line] * 30))  # dup_lines
        junk_docs.append(" ".join(str(int(x)) for x in rng.integers(0, 10**6, size=100)))  # alpha_fraction
        junk_docs.append(" ".join(_doc(rng, vocab, 3, 4)))  # min_words
    items += [(10**9 + j, t) for j, t in enumerate(junk_docs)]
    # Originals first (stable order), copies and junk spread after their sources.
    order = np.concatenate([np.arange(n_docs), n_docs + rng.permutation(len(items) - n_docs)])
    docs = [items[i][1] for i in order]
    counts = {"originals": n_docs, "exact_dups": n_exact, "near_dups": n_near, "dup_lines": n_junk,
              "alpha_fraction": n_junk, "min_words": n_junk}
    return Planted(docs, counts)


def write_jsonl(docs: List[str], out_dir: Path, files: int = 4, text_field: str = "text") -> List[Path]:
    """Write documents in contiguous runs over ``files`` .jsonl files (input order is kept)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // files)
    paths = []
    for f in range(files):
        p = out_dir / f"part-{f:03d}.jsonl"
        with open(p, "w", encoding="utf-8") as fh:
            for d in docs[f * per:(f + 1) * per]:
                fh.write(json.dumps({text_field: d, "id": f}) + "\n")
        paths.append(p)
    return paths
