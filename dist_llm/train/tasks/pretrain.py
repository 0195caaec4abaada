"""Causal LM pretraining: today's objective, bit for bit (the model computes its own loss)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from dist_llm.config.schema import JobConfig
from dist_llm.train.tasks.base import TOKENS, Batch, Metrics, Task, register_task


@register_task("pretrain")
class PretrainTask(Task):
    sample_format = TOKENS

    def build_model(self, cfg: JobConfig) -> nn.Module:
        from dist_llm.models import build_model

        return build_model(cfg.model)

    def flops_per_token(self, cfg: JobConfig) -> float:
        from dist_llm.models import flops_per_token

        return flops_per_token(cfg.model, cfg.train.seq_len)

    def loss(self, model, batch: Batch) -> Tuple[torch.Tensor, Metrics]:
        assert isinstance(batch, torch.Tensor), "pretrain takes [B, T+1] token ids"
        return model(batch[:, :-1], batch[:, 1:]), {}
