"""A key/value cache for incremental decoding with :class:`~dist_llm.models.gpt.GPT`.

Each attention layer appends the keys and values of the new positions and attends over
everything cached so far, so a decoding step costs one token's worth of compute instead of
re-running the whole prefix. The cache holds ``n_kv_heads`` heads (grouped-query attention
shares them between query heads, which is where its memory saving comes from) and keys are
stored after RoPE, so a cached key never needs rotating again.

The cache is preallocated to ``capacity`` positions for the whole batch and every row advances
together; rows of different lengths are left-padded by the caller, who passes a key-padding
mask (``attn_mask``) and per-row ``positions`` to ``GPT.forward``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


class KVCache:
    """Keys and values [n_layers, batch, n_kv_heads, capacity, head_dim] plus the number of
    positions filled (``length``), which is the same for every row."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.length = 0

    @classmethod
    def for_model(cls, model: nn.Module, batch: int, capacity: int) -> "KVCache":
        """An empty cache shaped for ``model`` (a GPT: reads its resolved config)."""
        cfg = model.cfg
        weight = next(model.parameters())
        return cls(cfg.n_layers, batch, cfg.n_kv_heads, cfg.d_model // cfg.n_heads, capacity,
                   device=weight.device, dtype=weight.dtype)

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` [B, Hkv, T, hd] at the positions after ``length`` and return the
        layer's keys and values for all ``length + T`` positions. ``length`` itself moves only in
        :meth:`advance`, once every layer has appended (the model calls it)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} positions needed, capacity {self.capacity}; "
                             f"allocate the cache for prompt length + max_new_tokens")
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n
