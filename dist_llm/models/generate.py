"""Autoregressive sampling from a :class:`~dist_llm.models.gpt.GPT`.

Deliberately simple (no KV cache: every step re-runs the cropped context). It serves end-of-run
samples and smoke tests on small models; serving uses its own path.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    eos_id: Optional[int] = None,
) -> torch.Tensor:
    """Extend ``input_ids`` [B, T] by up to ``max_new_tokens`` sampled tokens; returns
    [B, T + n] (prompt included).

    The context fed to the model is cropped to its last ``model.cfg.max_seq_len`` tokens, so
    generation can run past the model's window. ``temperature=0`` is greedy (argmax);
    ``top_k`` keeps only the k most likely tokens; ``generator`` makes sampling reproducible.
    With ``eos_id``, a row that has produced it keeps emitting ``eos_id`` (padding) and
    generation stops early once every row has. The model runs in eval mode (no dropout) and
    its train/eval mode is restored afterwards.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")

    max_seq_len: int = model.cfg.max_seq_len
    was_training = model.training
    model.eval()
    try:
        tokens = input_ids
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            logits = model(tokens[:, -max_seq_len:])[:, -1, :].float()
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth_best, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)
            if eos_id is not None:
                next_token = next_token.masked_fill(finished.unsqueeze(-1), eos_id)
                finished |= next_token.squeeze(-1) == eos_id
            tokens = torch.cat([tokens, next_token], dim=1)
            if eos_id is not None and bool(finished.all()):
                break
        return tokens
    finally:
        model.train(was_training)
