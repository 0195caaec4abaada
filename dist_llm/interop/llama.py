"""Llama (``LlamaForCausalLM``) <-> our ``llama`` preset, grouped-query attention included.

Our RoPE is the rotate-half convention (``models/gpt.py``: ``rope_tables``/``apply_rope``), the
one Hugging Face Llama uses, so q/k rows need no permutation: the mapping is a split of our fused
``qkv`` rows ``[q (n_heads*hd); k (n_kv*hd); v (n_kv*hd)]`` into ``q_proj``/``k_proj``/``v_proj``
and back. ``fc_gate``/``fc_in``/``fc_out`` are ``gate_proj``/``up_proj``/``down_proj``.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from dist_llm.config.schema import ModelConfig
from dist_llm.interop._common import owned, require, strip_prefix, take
from dist_llm.models.gpt import resolve_model_config

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"


def n_kv_heads(cfg: ModelConfig) -> int:
    return cfg.n_kv_heads or cfg.n_heads


def _rope_theta(c: Dict[str, Any], source: str) -> float:
    """RoPE base from ``rope_parameters`` (transformers >= 5) or the older top-level fields;
    any scaling (linear, dynamic, yarn, llama3) is refused: our tables are plain RoPE."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling")
    rope_type = params.get("rope_type", params.get("type", "default"))
    require(rope_type == "default" and not scaling, source, "rope_scaling",
            scaling or params, "only unscaled RoPE (rope_type 'default') is implemented")
    return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def config_from_hf(hf: Dict[str, Any], source: str = "config.json") -> ModelConfig:
    from transformers import LlamaConfig

    c = LlamaConfig.from_dict(dict(hf)).to_dict()
    heads, d_model = c["num_attention_heads"], c["hidden_size"]
    kv = c.get("num_key_value_heads") or heads
    require(c["hidden_act"] == "silu", source, "hidden_act", c["hidden_act"], "only SwiGLU with silu is implemented")
    require(d_model % heads == 0, source, "hidden_size", d_model, "must be divisible by num_attention_heads")
    head_dim = c.get("head_dim") or d_model // heads
    require(head_dim == d_model // heads, source, "head_dim", head_dim,
            f"must equal hidden_size/num_attention_heads = {d_model // heads}")
    require(heads % kv == 0, source, "num_key_value_heads", kv, "must divide num_attention_heads")
    require(c.get("pretraining_tp", 1) == 1, source, "pretraining_tp", c.get("pretraining_tp"), "set it to 1")
    attn_bias, mlp_bias = bool(c.get("attention_bias")), bool(c.get("mlp_bias"))
    require(attn_bias == mlp_bias, source, "attention_bias/mlp_bias", (attn_bias, mlp_bias),
            "model.bias switches every linear layer: both must be equal")
    return ModelConfig(
        preset="llama", n_layers=c["num_hidden_layers"], n_heads=heads, d_model=d_model,
        d_ff=c["intermediate_size"], max_seq_len=c["max_position_embeddings"], vocab_size=c["vocab_size"],
        bias=attn_bias, tie_embeddings=bool(c.get("tie_word_embeddings", False)), norm_eps=c["rms_norm_eps"],
        rope_theta=_rope_theta(c, source), n_kv_heads=kv,
    )


def config_to_hf(cfg: ModelConfig) -> Dict[str, Any]:
    from transformers import LlamaConfig

    cfg = resolve_model_config(cfg)
    require(cfg.preset == "llama", "model", "model.preset", cfg.preset, "use the gpt2 adapter")
    bias = bool(cfg.bias)
    hf = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=n_kv_heads(cfg),
        head_dim=cfg.head_dim or cfg.d_model // cfg.n_heads, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=bool(cfg.tie_embeddings),
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=bias, mlp_bias=bias, attention_dropout=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    ).to_dict()
    hf["architectures"] = [ARCHITECTURE]
    return hf


_SIMPLE = {  # our per-block name -> HF per-layer name (same shape, no transpose)
    "norm1.weight": "input_layernorm.weight", "norm2.weight": "post_attention_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight", "attn.proj.bias": "self_attn.o_proj.bias",
    "mlp.fc_gate.weight": "mlp.gate_proj.weight", "mlp.fc_gate.bias": "mlp.gate_proj.bias",
    "mlp.fc_in.weight": "mlp.up_proj.weight", "mlp.fc_in.bias": "mlp.up_proj.bias",
    "mlp.fc_out.weight": "mlp.down_proj.weight", "mlp.fc_out.bias": "mlp.down_proj.bias",
}


def _qkv_sizes(cfg: ModelConfig):
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    return [cfg.n_heads * hd, n_kv_heads(cfg) * hd, n_kv_heads(cfg) * hd]


def state_dict_from_hf(sd: Dict[str, torch.Tensor], cfg: ModelConfig,
                       source: str = "model.safetensors") -> Dict[str, torch.Tensor]:
    cfg = resolve_model_config(cfg)
    hf = strip_prefix(sd, ("model.",))
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    out = {"tok_emb.weight": take(hf, "embed_tokens.weight", source),
           "final_norm.weight": take(hf, "norm.weight", source)}
    for i in range(cfg.n_layers):
        pre = f"layers.{i}."
        for ours, theirs in _SIMPLE.items():
            if ours.endswith(".bias") and not cfg.bias:
                continue
            out[f"blocks.{i}.{ours}"] = take(hf, pre + theirs, source)
        for kind in kinds:
            parts = [take(hf, f"{pre}self_attn.{p}_proj.{kind}", source) for p in "qkv"]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else take(hf, "lm_head.weight", source)
    return owned(out)


def state_dict_to_hf(sd: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    cfg = resolve_model_config(cfg)
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    out = {"model.embed_tokens.weight": take(sd, "tok_emb.weight"), "model.norm.weight": take(sd, "final_norm.weight")}
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        for ours, theirs in _SIMPLE.items():
            if ours.endswith(".bias") and not cfg.bias:
                continue
            out[pre + theirs] = take(sd, f"blocks.{i}.{ours}")
        for kind in kinds:
            q, k, v = take(sd, f"blocks.{i}.attn.qkv.{kind}").split(_qkv_sizes(cfg), dim=0)
            out[f"{pre}self_attn.q_proj.{kind}"], out[f"{pre}self_attn.k_proj.{kind}"] = q, k
            out[f"{pre}self_attn.v_proj.{kind}"] = v
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take(sd, "lm_head.weight")
    return owned(out)
