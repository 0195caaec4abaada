"""Building blocks shared by the BERT and ViT encoders (plain modules, no parallelism).

One layer class serves both: BERT normalises after each residual add (post-LN), ViT before
each sub-block (pre-norm). Attention is bidirectional; an optional boolean key mask hides
padding. Numerics follow Hugging Face's BERT/ViT (exact erf GELU, LayerNorm eps from config,
softmax scale 1/sqrt(head_dim)) so imported weights reproduce their logits.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dist_llm.config.schema import EncoderConfig


def ff_width(cfg: EncoderConfig) -> int:
    return cfg.d_ff if cfg.d_ff else 4 * cfg.d_model


class SelfAttention(nn.Module):
    """Multi-head bidirectional attention with a fused QKV projection (q, k, v stacked)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        # key_mask [B, T] True = attend; broadcast over heads and queries
        mask = None if key_mask is None else key_mask[:, None, None, :].to(torch.bool)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, ff_width(cfg))
        self.proj = nn.Linear(ff_width(cfg), cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))  # erf GELU, HF's "gelu"


class EncoderLayer(nn.Module):
    """``pre_norm=False``: BERT's ``LN(x + drop(f(x)))``; ``True``: ViT's ``x + f(LN(x))``."""

    def __init__(self, cfg: EncoderConfig, pre_norm: bool) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.attn_norm(x), key_mask))
            return x + self.drop(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.drop(self.attn(x, key_mask)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


def init_weights(module: nn.Module, std: float) -> None:
    """BERT/ViT initialisation: N(0, std) weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
