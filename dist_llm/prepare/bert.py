"""BERT pre-training pairs with next-sentence labels, built per document from its sentences.

Follows Google's ``create_instances_from_document`` (without the short-sequence trick):
sentences are gathered until ``seq_len - 3`` tokens, split at a random point into A and B; with
probability ``random_next_prob`` B is replaced by sentences from a random *other* document of
the split (label 1; a split holding a single document draws it from another split, so its NSP
labels are not all 0) and the unused sentences go back to the pool. The RNG is seeded by
``(seed, split, document)``, so a shard is the same whoever writes it and whenever.
Masked-LM masking is left to the loader (a fresh mask per epoch is better than a frozen one).
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Tuple

import numpy as np


def max_pairs(docs: Dict[str, np.ndarray], seq_len: int) -> np.ndarray:
    """An upper bound of pairs per document (sample keys stay unique without a second pass)."""
    return docs["nsent"] + docs["ntok"] // max(seq_len - 3, 1) + 1


def _truncate(a: List[int], b: List[int], limit: int, rng: np.random.Generator) -> None:
    while len(a) + len(b) > limit:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def _random_segment(sents: List[List[int]], start: int, need: int) -> List[int]:
    """Contiguous sentences of a donor document from ``start`` until ``need`` tokens; when the
    donor ends first, earlier sentences are prepended instead.

    Why: a random B cut short by the end of its donor is padded while a true next B (the rest
    of a full chunk) almost never is, so padding alone predicted "random" on the training split
    (16% of random pairs padded vs 0% of next pairs on the 400 kB stdlib set; a padding-only
    classifier scored 0.57 there and 0.50 on val): a shortcut that does not transfer.
    """
    end = start
    b: List[int] = []
    while end < len(sents) and (not b or len(b) < need):  # at least one sentence (A may fill alone)
        b.extend(sents[end])
        end += 1
    while start > 0 and len(b) < need:
        start -= 1
        b[:0] = sents[start]
    return b


def pairs_for_document(packer: Any, split: str, d: int) -> Iterator[Tuple[np.ndarray, np.ndarray, int]]:
    """``(tokens[seq_len], segments[seq_len] uint8, nsp)``; nsp 0 = B follows A, 1 = random B."""
    sp, L = packer.sp, packer.seq_len
    target = L - 3
    ndocs = len(packer.docs[split]["ntok"])
    # A split of one document (a small val split) has no other document of its own to draw a
    # random B from, which would leave every NSP label 0: draw from another split instead.
    donor = split
    if ndocs == 1:
        donor = next((s for s in sorted(packer.docs) if s != split and len(packer.docs[s]["ntok"])), split)
    ndonor = len(packer.docs[donor]["ntok"])
    rng = np.random.default_rng([packer.seed, 0 if split == "train" else 1, d])
    sents = [s.tolist() for s in packer.sentences(split, d) if len(s)]
    chunk: List[List[int]] = []
    length, i = 0, 0
    while i < len(sents):
        chunk.append(sents[i])
        length += len(sents[i])
        if i == len(sents) - 1 or length >= target:
            a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
            a = [t for s in chunk[:a_end] for t in s]
            if (ndocs > 1 or donor != split) and (len(chunk) == 1 or rng.random() < packer.p_random):
                if donor == split:
                    other = int(rng.integers(0, ndocs - 1))
                    other += other >= d
                else:
                    other = int(rng.integers(0, ndonor))
                rs = [s.tolist() for s in packer.sentences(donor, other) if len(s)] or [[]]
                b = _random_segment(rs, int(rng.integers(0, len(rs))), target - len(a))
                nsp = 1
                i -= len(chunk) - a_end  # the sentences not used as A go back
            else:
                b = [t for s in chunk[a_end:] for t in s]
                nsp = 0
            if a and b:
                _truncate(a, b, target, rng)
                toks = [sp["cls"], *a, sp["sep"], *b, sp["sep"]]
                segs = [0] * (len(a) + 2) + [1] * (len(b) + 1)
                pad = L - len(toks)
                yield (np.array(toks + [sp["pad"]] * pad, dtype=np.int64),
                       np.array(segs + [0] * pad, dtype=np.uint8), nsp)
            chunk, length = [], 0
        i += 1
