"""Masked-LM masking, deterministic from ``(seed, step, sample_index)``.

Each sample gets its own ``torch.Generator`` seeded from a hash of the triple (a counter-based
scheme: no generator state carries from one sample to the next), so a resumed run, a different
data-parallel size or a different worker count masks every sample exactly as an uninterrupted
single-process run does.

BERT's recipe: choose ``round(mlm_prob * n)`` of the ``n`` non-special positions (at least one);
of those, 80% become ``[MASK]``, 10% a random non-special token, 10% stay unchanged. Labels hold
the original id at chosen positions and ``-100`` (ignored by the loss) elsewhere.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Tuple

import torch

IGNORE_INDEX = -100
_TAG = b"dist-llm/mlm-mask/1"


def sample_generator(seed: int, step: int, sample_index: int) -> torch.Generator:
    """A generator whose stream depends only on the triple (blake2b of it, 63 bits)."""
    h = hashlib.blake2b(_TAG + b"%d/%d/%d" % (int(seed), int(step), int(sample_index)), digest_size=8)
    return torch.Generator().manual_seed(int.from_bytes(h.digest(), "little") >> 1)


def mask_tokens(ids: torch.Tensor, special_ids: Iterable[int], mask_id: int, vocab_size: int, seed: int,
                step: int, sample_index: int, mlm_prob: float = 0.15) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` for one 1-D sample ``ids``; ``ids`` itself is not modified."""
    if ids.dim() != 1:
        raise ValueError(f"mask_tokens takes one sample (1-D ids), got shape {list(ids.shape)}")
    specials = torch.tensor(sorted({int(s) for s in special_ids} | {int(mask_id)}), dtype=torch.long)
    ids = ids.to(torch.long)
    g = sample_generator(seed, step, sample_index)
    candidates = torch.nonzero(~torch.isin(ids, specials)).flatten()
    labels = torch.full_like(ids, IGNORE_INDEX)
    out = ids.clone()
    if candidates.numel() == 0:
        return out, labels
    n = max(1, int(round(mlm_prob * candidates.numel())))
    chosen = candidates[torch.randperm(candidates.numel(), generator=g)[:n]]
    labels[chosen] = ids[chosen]
    action = torch.rand(n, generator=g)  # < 0.8 mask, < 0.9 random token, else keep
    out[chosen[action < 0.8]] = int(mask_id)
    rnd = chosen[(action >= 0.8) & (action < 0.9)]
    if rnd.numel():
        allowed = torch.nonzero(~torch.isin(torch.arange(vocab_size), specials)).flatten()
        out[rnd] = allowed[torch.randint(0, allowed.numel(), (rnd.numel(),), generator=g)]
    return out, labels


def mask_batch(ids: torch.Tensor, special_ids: Iterable[int], mask_id: int, vocab_size: int, seed: int,
               step: int, sample_indices: Iterable[int], mlm_prob: float = 0.15) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`mask_tokens` for each row of ``ids`` [B, T] with its own global sample index."""
    specials = list(special_ids)
    pairs = [mask_tokens(row, specials, mask_id, vocab_size, seed, step, int(i), mlm_prob)
             for row, i in zip(ids, sample_indices)]
    if len(pairs) != ids.shape[0]:
        raise ValueError(f"{ids.shape[0]} rows but {len(pairs)} sample indices")
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
