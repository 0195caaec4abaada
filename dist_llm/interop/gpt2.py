"""GPT-2 (``GPT2LMHeadModel``) <-> our ``gpt2`` preset.

Hugging Face GPT-2 keeps its projections in ``Conv1D`` modules whose weight is ``[in, out]`` (the
transpose of ``nn.Linear``), and fuses q/k/v into ``c_attn`` with output columns ``[q; k; v]``,
heads contiguous: the same order as our fused ``qkv`` rows, so a transpose is the whole mapping.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from dist_llm.config.schema import ModelConfig
from dist_llm.interop._common import owned, require, strip_prefix, take
from dist_llm.models.gpt import resolve_model_config

MODEL_TYPE = "gpt2"
ARCHITECTURE = "GPT2LMHeadModel"
# Both are the tanh approximation of GELU, which is what our gpt2 MLP computes.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def config_from_hf(hf: Dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a GPT-2 ``config.json`` dict; unsupported options raise, naming the field.

    Dropout is a training choice, not part of the architecture, so it is left to our config.
    """
    from transformers import GPT2Config

    c = GPT2Config.from_dict(dict(hf)).to_dict()
    require(c["activation_function"] in TANH_GELUS, source, "activation_function", c["activation_function"],
            f"only the tanh GELU ({', '.join(TANH_GELUS)}) is implemented")
    require(c.get("scale_attn_weights", True), source, "scale_attn_weights", c.get("scale_attn_weights"),
            "attention is always scaled by 1/sqrt(head_dim)")
    require(not c.get("scale_attn_by_inverse_layer_idx", False), source, "scale_attn_by_inverse_layer_idx",
            c.get("scale_attn_by_inverse_layer_idx"), "set it to false")
    require(not c.get("add_cross_attention", False), source, "add_cross_attention",
            c.get("add_cross_attention"), "decoder-only models only")
    require(c["n_embd"] % c["n_head"] == 0, source, "n_embd", c["n_embd"], "must be divisible by n_head")
    return ModelConfig(
        preset="gpt2", n_layers=c["n_layer"], n_heads=c["n_head"], d_model=c["n_embd"],
        d_ff=c.get("n_inner") or 4 * c["n_embd"], max_seq_len=c["n_positions"], vocab_size=c["vocab_size"],
        bias=True, tie_embeddings=bool(c.get("tie_word_embeddings", True)), norm_eps=c["layer_norm_epsilon"],
    )


def config_to_hf(cfg: ModelConfig) -> Dict[str, Any]:
    """A ``config.json`` dict for ``GPT2LMHeadModel`` (dropouts 0: an export is for inference)."""
    from transformers import GPT2Config

    cfg = resolve_model_config(cfg)
    require(cfg.preset == "gpt2", "model", "model.preset", cfg.preset, "use the llama adapter")
    require(bool(cfg.bias), "model", "model.bias", cfg.bias, "Hugging Face GPT-2 always has biases")
    require(cfg.head_dim in (None, cfg.d_model // cfg.n_heads), "model", "model.head_dim", cfg.head_dim,
            "Hugging Face GPT-2 needs n_heads*head_dim == d_model (a head-pruned model cannot be exported as GPT-2)")
    hf = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.d_ff, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std, tie_word_embeddings=bool(cfg.tie_embeddings),
        bos_token_id=None, eos_token_id=None,
    ).to_dict()
    hf["architectures"] = [ARCHITECTURE]
    return hf


# our name suffix -> HF name suffix for the per-block tensors; "T" marks a Conv1D weight.
_BLOCK = {
    "norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias",
    "attn.qkv.weight": "attn.c_attn.weight T", "attn.qkv.bias": "attn.c_attn.bias",
    "attn.proj.weight": "attn.c_proj.weight T", "attn.proj.bias": "attn.c_proj.bias",
    "norm2.weight": "ln_2.weight", "norm2.bias": "ln_2.bias",
    "mlp.fc_in.weight": "mlp.c_fc.weight T", "mlp.fc_in.bias": "mlp.c_fc.bias",
    "mlp.fc_out.weight": "mlp.c_proj.weight T", "mlp.fc_out.bias": "mlp.c_proj.bias",
}
_TOP = {"tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight",
        "final_norm.weight": "ln_f.weight", "final_norm.bias": "ln_f.bias"}


def _pairs(cfg: ModelConfig):
    """(our key, HF key without the ``transformer.`` prefix, transposed?) for every tensor."""
    for ours, theirs in _TOP.items():
        yield ours, theirs, False
    for i in range(cfg.n_layers):
        for ours, theirs in _BLOCK.items():
            name, _, flag = theirs.partition(" ")
            yield f"blocks.{i}.{ours}", f"h.{i}.{name}", flag == "T"


def state_dict_from_hf(sd: Dict[str, torch.Tensor], cfg: ModelConfig,
                       source: str = "model.safetensors") -> Dict[str, torch.Tensor]:
    cfg = resolve_model_config(cfg)
    hf = strip_prefix(sd, ("transformer.",))
    out = {}
    for ours, theirs, transpose in _pairs(cfg):
        t = take(hf, theirs, source)
        out[ours] = t.t() if transpose else t
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    else:
        out["lm_head.weight"] = take(hf, "lm_head.weight", source)
    return owned(out)


def state_dict_to_hf(sd: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """HF tensors; a tied LM head is left out (transformers re-ties it on load)."""
    cfg = resolve_model_config(cfg)
    out = {}
    for ours, theirs, transpose in _pairs(cfg):
        t = take(sd, ours)
        out[f"transformer.{theirs}"] = t.t() if transpose else t
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take(sd, "lm_head.weight")
    return owned(out)
