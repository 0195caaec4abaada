"""Models as plain ``nn.Module``s; nothing here imports torch.distributed or an engine."""
from __future__ import annotations

from torch import nn

from dist_llm.config.schema import ModelConfig
from dist_llm.models.flops import flops_per_token
from dist_llm.models.generate import GenerationResult, SamplingParams, generate, generate_batch
from dist_llm.models.gpt import GPT, resolve_model_config
from dist_llm.models.kv_cache import KVCache


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model for ``cfg`` (today always a :class:`GPT`); the one place engines build from,
    so a new architecture only has to be wired in here."""
    return GPT(cfg)


__all__ = ["GPT", "GenerationResult", "KVCache", "SamplingParams", "build_model", "flops_per_token", "generate",
           "generate_batch", "resolve_model_config"]
