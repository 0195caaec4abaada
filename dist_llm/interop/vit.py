"""Hugging Face ViT <-> our :class:`~dist_llm.models.vit.ViT`, both directions.

Import reads a ``save_pretrained`` directory of ``ViTForImageClassification`` (all weights) or
``ViTModel`` (encoder only; the classifier keeps its init and is reported missing; a pooler, if
present, is ignored since classification uses the class token). Export writes a directory
``transformers.ViTForImageClassification.from_pretrained`` loads with no missing keys.
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
from dist_llm.models.vit import ViT

HEADS = ("head.weight", "head.bias")


def encoder_config_from_hf(hf: Dict, file: Path = Path("config.json")) -> EncoderConfig:
    require(hf, file, "hidden_act", ["gelu"], "gelu")
    if hf["hidden_size"] % hf["num_attention_heads"]:
        raise HFImportError(f"{file}: hidden_size={hf['hidden_size']} is not divisible by "
                            f"num_attention_heads={hf['num_attention_heads']}")
    if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        raise HFImportError(f"{file}: head_dim={hf['head_dim']} is not hidden_size/num_attention_heads; "
                            f"not supported")
    for f in ("image_size", "patch_size"):
        if not isinstance(hf.get(f, 0), int):
            raise HFImportError(f"{file}: {f}={hf[f]!r} must be a single int (square images and patches)")
    labels = hf.get("id2label") or {}
    return EncoderConfig(
        arch=EncoderArch.vit, n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        d_model=hf["hidden_size"], d_ff=hf["intermediate_size"], norm_eps=hf.get("layer_norm_eps", 1e-12),
        dropout=hf.get("hidden_dropout_prob", 0.0), init_std=hf.get("initializer_range", 0.02),
        qkv_bias=hf.get("qkv_bias", True), image_size=hf.get("image_size", 224),
        patch_size=hf.get("patch_size", 16), num_channels=hf.get("num_channels", 3),
        num_classes=hf.get("num_labels", len(labels) or 2),
    )


def name_map(n_layers: int, qkv_bias: bool = True) -> NameMap:
    e = "vit.embeddings."
    m: NameMap = [("cls_token", [e + "cls_token"]), ("pos_emb", [e + "position_embeddings"]),
                  ("patch.weight", [e + "patch_embeddings.projection.weight"]),
                  ("patch.bias", [e + "patch_embeddings.projection.bias"])]
    for i in range(n_layers):
        p, o = f"vit.encoder.layer.{i}.", f"layers.{i}."
        for t in ("weight", "bias"):
            if t == "weight" or qkv_bias:
                m.append((f"{o}attn.qkv.{t}", [f"{p}attention.attention.{x}.{t}" for x in ("query", "key", "value")]))
            m += [(f"{o}attn.proj.{t}", [f"{p}attention.output.dense.{t}"]),
                  (f"{o}attn_norm.{t}", [f"{p}layernorm_before.{t}"]),
                  (f"{o}mlp.fc.{t}", [f"{p}intermediate.dense.{t}"]),
                  (f"{o}mlp.proj.{t}", [f"{p}output.dense.{t}"]),
                  (f"{o}mlp_norm.{t}", [f"{p}layernorm_after.{t}"])]
    for t in ("weight", "bias"):
        m += [(f"norm.{t}", [f"vit.layernorm.{t}"]), (f"head.{t}", [f"classifier.{t}"])]
    return m


def _our_state(hf: Dict[str, torch.Tensor], n_layers: int, qkv_bias: bool,
               source: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """HF tensors (task class or base-model names) -> (our state dict, missing head names)."""
    for marker in ("embeddings.", "encoder.", "layernorm."):
        hf = strip_prefix(hf, "vit.", marker)
    found = layer_indices(hf, "vit.encoder.layer.")
    if found is not None and found != n_layers:
        raise HFImportError(f"{source}: config.json says num_hidden_layers={n_layers} but the weights hold "
                            f"{found} layers")
    return import_state(name_map(n_layers, qkv_bias), hf, optional=HEADS, source=source)


def load_hf_vit(path: PathLike) -> Tuple[ViT, List[str]]:
    """``(model, missing)``: our ViT with the weights of the HF directory ``path``."""
    d = Path(path)
    cfg = encoder_config_from_hf(read_hf_config(d, "vit"), d / "config.json")
    state, missing = _our_state(read_hf_weights(d), cfg.n_layers, cfg.qkv_bias, str(d))
    model = ViT(cfg)
    load_into(model, state, str(d))
    return model, missing


def hf_config(cfg: EncoderConfig) -> Dict:
    return {
        "architectures": ["ViTForImageClassification"], "model_type": "vit", "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff or 4 * cfg.d_model, "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        "initializer_range": cfg.init_std, "layer_norm_eps": cfg.norm_eps, "image_size": cfg.image_size,
        "patch_size": cfg.patch_size, "num_channels": cfg.num_channels, "qkv_bias": cfg.qkv_bias,
        "num_labels": cfg.num_classes,
    }


def save_hf_vit(model: ViT, out_dir: PathLike) -> Path:
    """Write ``model`` as an HF ``ViTForImageClassification`` directory; returns it."""
    from transformers import ViTConfig

    d = Path(out_dir)
    write_hf_weights(d, export_state(name_map(model.cfg.n_layers, model.cfg.qkv_bias), model.state_dict()))
    ViTConfig(**hf_config(model.cfg)).save_pretrained(str(d))
    return d


# --- the registry interface (dist_llm/interop/__init__.py): model.init_from and dist-llm export ---
MODEL_TYPE = "vit"
ARCHITECTURE = "ViTForImageClassification"


def config_from_hf(hf: Dict, source: str = "config.json") -> ModelConfig:
    """``model.*`` (preset vit) for an HF ViT ``config.json`` dict."""
    return model_config_from_encoder(encoder_config_from_hf(hf, Path(source)))


def config_to_hf(cfg: ModelConfig) -> Dict:
    """A ``config.json`` dict for ``ViTForImageClassification`` (dropouts 0: for inference)."""
    from transformers import ViTConfig

    from dist_llm.models import encoder_config

    return ViTConfig(**{**hf_config(encoder_config(cfg)), "hidden_dropout_prob": 0.0,
                        "attention_probs_dropout_prob": 0.0}).to_dict()


def state_dict_from_hf(sd: Dict[str, torch.Tensor], cfg: ModelConfig, source: str = "state dict") -> Dict[str, torch.Tensor]:
    state, missing = _our_state(sd, cfg.n_layers, cfg.bias is not False, source)
    return fill_missing_heads(state, missing, cfg, source)


def state_dict_to_hf(sd: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    return export_state(name_map(cfg.n_layers, cfg.bias is not False), sd)
