"""Models as plain ``nn.Module``s; nothing here imports torch.distributed or an engine."""
from __future__ import annotations

from torch import nn

from dist_llm.config.choices import ENCODER_PRESETS, EncoderArch
from dist_llm.config.schema import EncoderConfig, ModelConfig
from dist_llm.models.bert import Bert
from dist_llm.models.flops import flops_per_token
from dist_llm.models.generate import GenerationResult, SamplingParams, generate, generate_batch
from dist_llm.models.gpt import GPT, resolve_model_config
from dist_llm.models.vit import ViT
from dist_llm.models.kv_cache import KVCache


def encoder_config(cfg: ModelConfig) -> EncoderConfig:
    """The one mapping from ``model.*`` (preset bert/vit) to the encoders' :class:`EncoderConfig`."""
    if str(cfg.preset) not in ENCODER_PRESETS:
        raise ValueError(f"model.preset={cfg.preset} is not an encoder (bert, vit)")
    pad = 0  # our tokenizers put <|pad|> at id 0 (char/bpe); byte-level BERT data is refused by the task
    return EncoderConfig(arch=EncoderArch(str(cfg.preset)), n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                         d_model=cfg.d_model, d_ff=cfg.d_ff, dropout=cfg.dropout, norm_eps=cfg.norm_eps,
                         init_std=cfg.init_std, qkv_bias=True if cfg.bias is None else bool(cfg.bias),
                         vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len,
                         type_vocab_size=cfg.type_vocab_size, pad_id=pad, image_size=cfg.image_size,
                         patch_size=cfg.patch_size, num_channels=cfg.num_channels, num_classes=cfg.num_classes)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model for ``cfg``: a :class:`GPT` (gpt2/llama) or an encoder (bert/vit); the one place
    engines build from, so a new architecture only has to be wired in here."""
    if str(cfg.preset) in ENCODER_PRESETS:
        return build_encoder(encoder_config(cfg))
    return GPT(cfg)


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    """A :class:`~dist_llm.models.bert.Bert` or :class:`~dist_llm.models.vit.ViT` for ``cfg.arch``."""
    return Bert(cfg) if EncoderArch(cfg.arch) is EncoderArch.bert else ViT(cfg)


__all__ = ["Bert", "ViT", "build_encoder", "encoder_config", "GPT", "GenerationResult", "KVCache", "SamplingParams", "build_model", "flops_per_token", "generate",
           "generate_batch", "resolve_model_config"]
