"""A short recovery fine-tune after pruning: plain AdamW in one process on the training shards.

Masks (unstructured pruning) are re-applied after every optimizer step, so pruned weights stay
exactly zero; a structurally pruned model needs none (its tensors are already smaller).
"""
from __future__ import annotations

from typing import Iterator, List, Optional

import torch

from dist_llm.compress.unstructured import Masks, apply_masks
from dist_llm.data import TrainLoader


def train_batches(train_dir: str, seq_len: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless deterministic batches ``[batch_size, seq_len + 1]`` from one shard directory (dp=1)."""
    loader = TrainLoader([(train_dir, 1.0)], seq_len, lanes=1, dp_rank=0, dp_size=1,
                         micro_batch_size=batch_size, grad_accum=1, seed=seed)
    try:
        while True:
            for micro in loader.next_step():
                yield micro
    finally:
        loader.close()


def finetune(model: torch.nn.Module, train_dir: str, seq_len: int, steps: int, lr: float, batch_size: int,
             weight_decay: float = 0.0, seed: int = 0, masks: Optional[Masks] = None,
             device: str = "cpu") -> List[float]:
    """Train ``model`` in place for ``steps`` steps; returns the per-step losses."""
    torch.manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    losses: List[float] = []
    batches = train_batches(train_dir, seq_len, batch_size, seed)
    for _ in range(steps):
        batch = next(batches).to(device)
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if masks is not None:
            apply_masks(model, masks)
        losses.append(float(loss.detach()))
    batches.close()
    model.eval()
    return losses
