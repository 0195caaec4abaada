"""Models as plain ``nn.Module``s; nothing here imports torch.distributed or an engine."""
from __future__ import annotations

from torch import nn

from dist_llm.config.schema import EncoderArch, EncoderConfig, ModelConfig
from dist_llm.models.bert import Bert
from dist_llm.models.flops import flops_per_token
from dist_llm.models.generate import GenerationResult, SamplingParams, generate, generate_batch
from dist_llm.models.gpt import GPT, resolve_model_config
from dist_llm.models.vit import ViT
from dist_llm.models.kv_cache import KVCache


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model for ``cfg`` (today always a :class:`GPT`); the one place engines build from,
    so a new architecture only has to be wired in here."""
    return GPT(cfg)


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    """A :class:`~dist_llm.models.bert.Bert` or :class:`~dist_llm.models.vit.ViT` for ``cfg.arch``."""
    return Bert(cfg) if EncoderArch(cfg.arch) is EncoderArch.bert else ViT(cfg)


__all__ = ["Bert", "ViT", "build_encoder", "GPT", "GenerationResult", "KVCache", "SamplingParams", "build_model", "flops_per_token", "generate",
           "generate_batch", "resolve_model_config"]
