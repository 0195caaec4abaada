"""Hugging Face BERT <-> our :class:`~dist_llm.models.bert.Bert`, both directions.

Import reads a ``save_pretrained`` directory of ``BertForPreTraining`` (all weights) or
``BertModel`` (encoder + pooler; the MLM/NSP heads then keep their fresh init and are reported
as missing). Export writes ``config.json`` + ``model.safetensors`` that
``transformers.BertForPreTraining.from_pretrained`` loads with no missing keys. HF options our
model does not implement are refused with the field's name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import torch

from dist_llm.config.choices import EncoderArch
from dist_llm.config.schema import EncoderConfig, ModelConfig
from dist_llm.interop._common_enc import (
    HFImportError, NameMap, fill_missing_heads, model_config_from_encoder, PathLike, export_state, import_state, layer_indices, load_into,
    read_hf_config, read_hf_weights, require, strip_prefix, write_hf_weights,
)
from dist_llm.models.bert import Bert

HEADS = ("pooler.weight", "pooler.bias", "mlm_dense.weight", "mlm_dense.bias", "mlm_norm.weight",
         "mlm_norm.bias", "mlm_bias", "nsp.weight", "nsp.bias")


def encoder_config_from_hf(hf: Dict, file: Path = Path("config.json")) -> EncoderConfig:
    """Our encoder config for an HF BERT ``config.json`` dict; unsupported options raise."""
    require(hf, file, "hidden_act", ["gelu"], "gelu")
    require(hf, file, "position_embedding_type", ["absolute"], "absolute")
    require(hf, file, "is_decoder", [False], False)
    require(hf, file, "add_cross_attention", [False], False)
    require(hf, file, "tie_word_embeddings", [True], True)
    if hf["hidden_size"] % hf["num_attention_heads"]:
        raise HFImportError(f"{file}: hidden_size={hf['hidden_size']} is not divisible by "
                            f"num_attention_heads={hf['num_attention_heads']}")
    return EncoderConfig(
        arch=EncoderArch.bert, n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        d_model=hf["hidden_size"], d_ff=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
        norm_eps=hf.get("layer_norm_eps", 1e-12), dropout=hf.get("hidden_dropout_prob", 0.1),
        init_std=hf.get("initializer_range", 0.02), pad_id=hf.get("pad_token_id") or 0,
    )


def name_map(n_layers: int) -> NameMap:
    e, h = "bert.embeddings.", "cls.predictions."
    m: NameMap = [
        ("tok_emb.weight", [e + "word_embeddings.weight"]), ("pos_emb.weight", [e + "position_embeddings.weight"]),
        ("type_emb.weight", [e + "token_type_embeddings.weight"]),
        ("emb_norm.weight", [e + "LayerNorm.weight"]), ("emb_norm.bias", [e + "LayerNorm.bias"]),
    ]
    for i in range(n_layers):
        p, o = f"bert.encoder.layer.{i}.", f"layers.{i}."
        for t in ("weight", "bias"):
            m += [
                (f"{o}attn.qkv.{t}", [f"{p}attention.self.{x}.{t}" for x in ("query", "key", "value")]),
                (f"{o}attn.proj.{t}", [f"{p}attention.output.dense.{t}"]),
                (f"{o}attn_norm.{t}", [f"{p}attention.output.LayerNorm.{t}"]),
                (f"{o}mlp.fc.{t}", [f"{p}intermediate.dense.{t}"]),
                (f"{o}mlp.proj.{t}", [f"{p}output.dense.{t}"]),
                (f"{o}mlp_norm.{t}", [f"{p}output.LayerNorm.{t}"]),
            ]
    for t in ("weight", "bias"):
        m += [(f"pooler.{t}", [f"bert.pooler.dense.{t}"]), (f"mlm_dense.{t}", [f"{h}transform.dense.{t}"]),
              (f"mlm_norm.{t}", [f"{h}transform.LayerNorm.{t}"]), (f"nsp.{t}", ["cls.seq_relationship." + t])]
    m.append(("mlm_bias", [h + "bias"]))
    return m


def _our_state(hf: Dict[str, torch.Tensor], n_layers: int, source: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """HF tensors (task class or base-model names) -> (our state dict, missing head names)."""
    for marker in ("embeddings.", "encoder.", "pooler."):
        hf = strip_prefix(hf, "bert.", marker)
    found = layer_indices(hf, "bert.encoder.layer.")
    if found is not None and found != n_layers:
        raise HFImportError(f"{source}: config.json says num_hidden_layers={n_layers} but the weights hold "
                            f"{found} layers")
    dec = hf.get("cls.predictions.decoder.weight")
    if dec is not None and not torch.equal(dec, hf["bert.embeddings.word_embeddings.weight"]):
        raise HFImportError(f"{source}: cls.predictions.decoder.weight differs from the word embeddings (untied "
                            f"MLM decoder); our BERT ties them, so this checkpoint cannot be imported")
    return import_state(name_map(n_layers), hf, optional=HEADS, source=source)


def load_hf_bert(path: PathLike) -> Tuple[Bert, List[str]]:
    """``(model, missing)``: our BERT with the weights of the HF directory ``path``; ``missing``
    lists head tensors the checkpoint lacks (a ``BertModel`` save), left at their init."""
    d = Path(path)
    cfg = encoder_config_from_hf(read_hf_config(d, "bert"), d / "config.json")
    state, missing = _our_state(read_hf_weights(d), cfg.n_layers, str(d))
    model = Bert(cfg)
    load_into(model, state, str(d))
    return model, missing


def hf_config(cfg: EncoderConfig) -> Dict:
    return {
        "architectures": ["BertForPreTraining"], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff or 4 * cfg.d_model, "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.init_std, "layer_norm_eps": cfg.norm_eps, "pad_token_id": cfg.pad_id,
        "position_embedding_type": "absolute", "tie_word_embeddings": True,
    }


def save_hf_bert(model: Bert, out_dir: PathLike) -> Path:
    """Write ``model`` as an HF ``BertForPreTraining`` directory; returns it."""
    from transformers import BertConfig

    if not model.cfg.qkv_bias:
        raise HFImportError("encoder.qkv_bias=False has no HF BERT equivalent; export needs qkv_bias=True")
    d = Path(out_dir)
    write_hf_weights(d, export_state(name_map(model.cfg.n_layers), model.state_dict()))
    BertConfig(**hf_config(model.cfg)).save_pretrained(str(d))
    return d


# --- the registry interface (dist_llm/interop/__init__.py): model.init_from and dist-llm export ---
MODEL_TYPE = "bert"
ARCHITECTURE = "BertForPreTraining"


def config_from_hf(hf: Dict, source: str = "config.json") -> ModelConfig:
    """``model.*`` (preset bert) for an HF BERT ``config.json`` dict."""
    return model_config_from_encoder(encoder_config_from_hf(hf, Path(source)))


def config_to_hf(cfg: ModelConfig) -> Dict:
    """A ``config.json`` dict for ``BertForPreTraining`` (dropouts 0: an export is for inference)."""
    from transformers import BertConfig

    from dist_llm.models import encoder_config

    enc = encoder_config(cfg)
    if not enc.qkv_bias:
        raise HFImportError("model.bias=False has no HF BERT equivalent; export needs attention biases")
    return BertConfig(**{**hf_config(enc), "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}).to_dict()


def state_dict_from_hf(sd: Dict[str, torch.Tensor], cfg: ModelConfig, source: str = "state dict") -> Dict[str, torch.Tensor]:
    state, missing = _our_state(sd, cfg.n_layers, source)
    return fill_missing_heads(state, missing, cfg, source)


def state_dict_to_hf(sd: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    return export_state(name_map(cfg.n_layers), sd)
