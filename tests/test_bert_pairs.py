"""BERT sentence pairs (dist_llm/prepare/bert.py): NSP labels against the true adjacency, and no
label leak through padding. Documents are synthetic: every token id names its (document,
sentence), so each pair can be traced back to where A and B came from."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from dist_llm.prepare.bert import pairs_for_document

SP = {"pad": 0, "mask": 3, "cls": 4, "sep": 5}
BASE, PER_DOC = 1000, 1000  # token id = BASE + doc * PER_DOC + sentence


class _Packer:
    """What pairs_for_document reads of a BertPacker: sp, seq_len, seed, p_random, docs, sentences."""

    sp, seed, p_random = SP, 7, 0.5

    def __init__(self, lens: Dict[str, List[List[int]]], seq_len: int = 64) -> None:
        self.seq_len, self.lens = seq_len, lens
        self.docs = {s: {"ntok": np.array([sum(d) for d in v], dtype=np.int64)} for s, v in lens.items()}

    def sentences(self, split: str, d: int) -> List[np.ndarray]:
        return [np.full(n, BASE + d * PER_DOC + j, np.int64) for j, n in enumerate(self.lens[split][d])]


def _pairs(p: _Packer, split: str = "train"):
    for d in range(len(p.lens[split])):
        for toks, segs, nsp in pairs_for_document(p, split, d):
            a, b = toks[(segs == 0) & (toks >= BASE)], toks[(segs == 1) & (toks >= BASE)]
            yield d, toks, segs, nsp, (a - BASE) // PER_DOC, (a - BASE) % PER_DOC, (b - BASE) // PER_DOC, \
                (b - BASE) % PER_DOC


def _corpus(ndocs: int, nsent: int, seed: int = 0) -> Dict[str, List[List[int]]]:
    rng = np.random.default_rng(seed)
    return {"train": [[int(rng.integers(3, 25)) for _ in range(nsent)] for _ in range(ndocs)]}


def test_next_pairs_continue_a_and_random_pairs_come_from_another_document():
    p = _Packer(_corpus(6, 120))
    labels = []
    for d, toks, segs, nsp, doc_a, sent_a, doc_b, sent_b in _pairs(p):
        labels.append(nsp)
        assert toks[0] == SP["cls"] and segs[0] == 0  # the NSP head reads position 0
        assert set(doc_a) == {d} and len(set(doc_b)) == 1
        if nsp == 0:  # B is the text after A in A's document (truncation may drop whole sentences)
            assert doc_b[0] == d and np.all(np.diff(np.concatenate([sent_a, sent_b])) >= 0)
        else:
            assert doc_b[0] != d
    assert 0.35 < np.mean(labels) < 0.65


def test_random_b_is_not_shorter_than_a_next_b():
    """A random B drawn near the end of its donor used to stop there (padded pairs only among the
    random ones: a label leak). Donors here are long enough to fill B from an earlier start."""
    p = _Packer(_corpus(4, 40, seed=1))
    padded = {0: [], 1: []}
    for d, toks, segs, nsp, doc_a, sent_a, doc_b, sent_b in _pairs(p):
        last = len(p.lens["train"][d]) - 1
        if nsp == 1 and sent_a[-1] < last - 3:  # not the document's short last chunk
            padded[1].append(bool((toks == SP["pad"]).any()))
            assert np.all(np.diff(sent_b) >= 0) and np.all(np.diff(sent_b) <= 1)  # contiguous donor text
        elif nsp == 0:
            padded[0].append(bool((toks == SP["pad"]).any()))
    assert len(padded[1]) > 10 and not any(padded[1]), f"{sum(padded[1])} of {len(padded[1])} random pairs padded"


def test_a_sentence_longer_than_the_pair_still_gets_a_random_b():
    """A chunk of one sentence that fills the pair alone is always a random pair (Google's rule);
    its B still gets a donor sentence and both are truncated to fit."""
    lens = _corpus(3, 30, seed=2)
    lens["train"][0] = [90] * 8  # every sentence longer than seq_len - 3
    p = _Packer(lens)
    pairs = [x for x in _pairs(p) if x[0] == 0]
    assert len(pairs) == 8 and all(nsp == 1 for _, _, _, nsp, *_ in pairs)
    assert all(len(sent_b) > 0 and len(sent_a) + len(sent_b) == p.seq_len - 3 for *_, sent_a, _, sent_b in pairs)
