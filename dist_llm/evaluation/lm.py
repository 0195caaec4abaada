"""Perplexity of a causal LM over a validation split of our token shards.

Deterministic: the first ``max_batches * batch_size`` samples of the split in shard order (the
same :class:`~dist_llm.data.ValLoader` validation uses during training, at dp=1), no shuffling, no
dropout. The loss is the token-weighted mean next-token cross-entropy (summed in float64), so two
models evaluated on the same split and arguments see exactly the same tokens.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from dist_llm.data import ValLoader
from dist_llm.data.sources import read_split_manifest


def evaluate_lm(model: torch.nn.Module, shard_dir: str, seq_len: Optional[int] = None, batch_size: int = 8,
                max_batches: int = 16, device: str = "cpu") -> Dict[str, float]:
    """``{"loss", "ppl", "tokens"}`` of ``model`` (``forward(ids) -> logits [B, T, V]``) on ``shard_dir``.

    ``seq_len`` None = the split's own; ``max_batches`` 0 = the whole split.
    """
    manifest = read_split_manifest(shard_dir)  # a directory or a URL (dist_llm/data/sources.py)
    seq_len = int(manifest["seq_len"]) if seq_len is None else seq_len
    num_samples = int(manifest["num_samples"]) if max_batches == 0 else max_batches * batch_size
    loader = ValLoader(shard_dir, seq_len, dp_rank=0, dp_size=1, micro_batch_size=batch_size,
                       num_samples=num_samples)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for batch in loader.batches():
                batch = batch.to(device)
                logits = model(batch[:, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                       reduction="sum")
                total += float(loss.double())
                tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    mean = total / tokens
    return {"loss": mean, "ppl": math.exp(mean), "tokens": tokens}
