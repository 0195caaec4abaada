"""Exact parameter counts of our GPT presets from the config alone (no torch).

Mirrors the shapes ``dist_llm.models.gpt`` builds; tests/test_planner.py checks the total
against ``sum(p.numel())`` of real built models. The split into tensor-parallel-sharded and
replicated parts follows Megatron: column/row-parallel weights and column-parallel biases are
sharded; norms and the row-parallel output biases are replicated on every tp rank.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from dist_llm.config.choices import DECODER_PRESETS


def resolved(cfg):
    """The preset defaults filled in (same rules as ``models.gpt.resolve_model_config``)."""
    if cfg.preset not in DECODER_PRESETS:
        raise ValueError(f"model.preset={cfg.preset!r} is not a known preset; allowed: {', '.join(DECODER_PRESETS)}")
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"model.d_model={cfg.d_model} must be divisible by model.n_heads={cfg.n_heads}")
    gpt2 = cfg.preset == "gpt2"
    d_ff = cfg.d_ff
    if d_ff is None:
        d_ff = 4 * cfg.d_model if gpt2 else 16 * math.ceil(int(8 * cfg.d_model / 3) / 16)
    return dataclasses.replace(
        cfg, n_kv_heads=cfg.n_heads if cfg.n_kv_heads is None else cfg.n_kv_heads, d_ff=d_ff,
        bias=gpt2 if cfg.bias is None else cfg.bias,
        tie_embeddings=gpt2 if cfg.tie_embeddings is None else cfg.tie_embeddings)


@dataclass
class ModelParams:
    n_layers: int
    layer_sharded: int  # per block, split over tp
    layer_replicated: int  # per block, on every tp rank
    tok_emb: int  # vocab x d_model (vocab-parallel over tp)
    pos_emb: int  # learned positions (gpt2), replicated
    final_norm: int
    lm_head: int  # 0 when tied to the token embedding
    tied: bool

    @property
    def total(self) -> int:
        return (self.n_layers * (self.layer_sharded + self.layer_replicated) + self.tok_emb + self.pos_emb
                + self.final_norm + self.lm_head)


def count_params(cfg) -> ModelParams:
    m = resolved(cfg)
    d, f = m.d_model, m.d_ff
    head_dim = d // m.n_heads
    qkv_out = (m.n_heads + 2 * m.n_kv_heads) * head_dim
    bias = bool(m.bias)
    llama = m.preset == "llama"
    norm = d if llama else d * (2 if bias else 1)  # RMSNorm gain | LayerNorm gain (+ bias)
    mlp_in = (2 if llama else 1) * (d * f + (f if bias else 0))  # fc_in (+ fc_gate), column-parallel
    sharded = d * qkv_out + (qkv_out if bias else 0) + d * d + mlp_in + f * d
    replicated = 2 * norm + (2 * d if bias else 0)  # two norms, proj and fc_out biases (row-parallel)
    tied = bool(m.tie_embeddings)
    return ModelParams(n_layers=m.n_layers, layer_sharded=sharded, layer_replicated=replicated,
                       tok_emb=m.vocab_size * d, pos_emb=0 if llama else m.max_seq_len * d,
                       final_norm=norm, lm_head=0 if tied else m.vocab_size * d, tied=tied)
