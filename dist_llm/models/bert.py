"""BERT as a plain module: post-LN encoder, pooler, MLM head tied to the word embeddings, NSP head.

Matches Hugging Face's ``BertForPreTraining`` numerics (see :mod:`dist_llm.interop.bert` for the
weight mapping): embeddings are word + learned position + token type, then LayerNorm; the
pooler is ``tanh(W h_[CLS] + b)``; the MLM head is dense + GELU + LayerNorm, then the word
embedding matrix (transposed) plus an output-only bias; NSP is a 2-way linear on the pooler.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dist_llm.config.schema import EncoderConfig
from dist_llm.models.encoder import EncoderLayer, init_weights

IGNORE_INDEX = -100  # MLM label of a position that is not predicted (HF and torch convention)


class BertOutput(NamedTuple):
    mlm_logits: torch.Tensor  # [B, T, vocab]
    nsp_logits: torch.Tensor  # [B, 2]; 0 = B follows A, 1 = B is random


class Bert(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, d)
        self.emb_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg, pre_norm=False) for _ in range(cfg.n_layers))
        self.pooler = nn.Linear(d, d)
        self.mlm_dense = nn.Linear(d, d)
        self.mlm_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.nsp = nn.Linear(d, 2)
        init_weights(self, cfg.init_std)

    def encode(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
               attention_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [B, T, d], pooled [B, d])``; ``attention_mask`` [B, T] is 1/True for real tokens."""
        T = input_ids.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds encoder.max_seq_len={self.cfg.max_seq_len}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(T, device=input_ids.device)
        x = self.tok_emb(input_ids) + self.type_emb(token_type_ids) + self.pos_emb(pos)
        x = self.emb_drop(self.emb_norm(x))
        if attention_mask is not None:
            # a row with no real token (a filler row of a padded eval batch) softmaxes over no key:
            # some SDPA kernels give NaN, CPU gives 0; attend everywhere so every backend agrees
            attention_mask = attention_mask.bool() | ~attention_mask.bool().any(-1, keepdim=True)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x, torch.tanh(self.pooler(x[:, 0]))

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.mlm_norm(F.gelu(self.mlm_dense(hidden)))
        return F.linear(h, self.tok_emb.weight, self.mlm_bias)  # tied decoder

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> BertOutput:
        hidden, pooled = self.encode(input_ids, token_type_ids, attention_mask)
        return BertOutput(self.mlm_logits(hidden), self.nsp(pooled))


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose label is not ``IGNORE_INDEX`` (0 when none are)."""
    flat = labels.reshape(-1)
    if not (flat != IGNORE_INDEX).any():
        return logits.sum() * 0.0  # keeps the graph (and DDP/ZeRO hooks) alive
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE_INDEX)


def nsp_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels.reshape(-1))


def mlm_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[int, int]:
    """``(correct, predicted positions)`` so ranks can sum them before dividing."""
    keep = labels != IGNORE_INDEX
    return int((logits.argmax(-1)[keep] == labels[keep]).sum()), int(keep.sum())


def nsp_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[int, int]:
    return int((logits.argmax(-1) == labels.reshape(-1)).sum()), int(labels.numel())
