"""Shared plumbing of the encoder adapters (BERT, ViT): read/write an HF directory and apply a
name map between our state dict and Hugging Face's on-disk (``save_pretrained``) key names.

A map is a list of ``(our_name, [hf_names])``; several HF names are concatenated along dim 0
into one of ours (fused QKV) and split back equally on export. Weights are read and written
as safetensors only: nothing we load can execute code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from dist_llm.config.schema import EncoderConfig, ModelConfig
from dist_llm.interop import InteropError

PathLike = Union[str, Path]
NameMap = List[Tuple[str, List[str]]]


class HFImportError(InteropError):
    """An HF directory we cannot import: names the file/field and says the fix."""


def read_hf_config(path: PathLike, model_type: str) -> Dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise HFImportError(f"{f} not found: point at a directory written by transformers' save_pretrained")
    cfg = json.loads(f.read_text())
    if cfg.get("model_type") != model_type:
        raise HFImportError(f"{f}: model_type is {cfg.get('model_type')!r}, expected {model_type!r}; "
                            f"use the {cfg.get('model_type')} adapter or a {model_type} checkpoint")
    return cfg


def require(cfg: Dict, file: Path, field: str, allowed: Sequence, default=None) -> None:
    """Raise if ``cfg[field]`` (``default`` when absent) is not one of ``allowed``."""
    value = cfg.get(field, default)
    if value not in allowed:
        raise HFImportError(f"{file}: {field}={value!r} is not supported (supported: "
                            f"{', '.join(repr(a) for a in allowed)}); convert or pick another checkpoint")


def read_hf_weights(path: PathLike) -> Dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards a ``model.safetensors.index.json`` names."""
    from safetensors.torch import load_file

    d = Path(path)
    if (d / "model.safetensors").is_file():
        return load_file(str(d / "model.safetensors"))
    index = d / "model.safetensors.index.json"
    if index.is_file():
        out: Dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(str(d / shard)))
        return out
    raise HFImportError(f"{d} has no model.safetensors (or index): save with save_pretrained("
                        f"safe_serialization=True); pickled pytorch_model.bin is not loaded")


def strip_prefix(sd: Dict[str, torch.Tensor], prefix: str, marker: str) -> Dict[str, torch.Tensor]:
    """HF base models (``BertModel``, ``ViTModel``) save without the ``bert.``/``vit.`` prefix
    their task classes use; add it where ``marker`` shows a base-model key so one map serves both."""
    return {(prefix + k if k.startswith(marker) else k): v for k, v in sd.items()}


def import_state(name_map: NameMap, hf: Dict[str, torch.Tensor], optional: Sequence[str] = (),
                 source: str = "") -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Our state dict from HF tensors; names in ``optional`` (e.g. task heads) may be absent and are
    returned as the second value. Any other missing tensor is an error naming it."""
    out: Dict[str, torch.Tensor] = {}
    missing: List[str] = []
    for ours, names in name_map:
        absent = [n for n in names if n not in hf]
        if absent:
            if ours in optional:
                missing.append(ours)
                continue
            raise HFImportError(f"{source}: tensor {absent[0]!r} is missing (needed for our {ours!r}); "
                                f"is the checkpoint complete and of the expected architecture?")
        ts = [hf[n] for n in names]
        out[ours] = ts[0] if len(ts) == 1 else torch.cat(ts, dim=0)
    return out, missing


def export_state(name_map: NameMap, ours: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for name, names in name_map:
        if name not in ours:
            continue
        t = ours[name].detach().to("cpu")
        for hf_name, part in zip(names, t.chunk(len(names), dim=0)):
            out[hf_name] = part.contiguous().clone()
    return out


def load_into(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``, with an error naming the tensor on a shape mismatch."""
    own = model.state_dict()
    for k, v in state.items():
        if k not in own:
            raise HFImportError(f"{source}: mapped tensor {k!r} has no place in our model (adapter bug)")
        if own[k].shape != v.shape:
            raise HFImportError(f"{source}: {k!r} has shape {list(v.shape)} but our config gives "
                                f"{list(own[k].shape)}; the config mapping and the weights disagree")
    model.load_state_dict(state, strict=False)


def write_hf_weights(out_dir: PathLike, tensors: Dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    f = d / "model.safetensors"
    save_file(tensors, str(f), metadata={"format": "pt"})
    return f


def layer_indices(hf: Dict[str, torch.Tensor], prefix: str) -> Optional[int]:
    """How many layers ``{prefix}{i}.`` keys describe (None when there are none)."""
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in hf if k.startswith(prefix)}
    return max(idx) + 1 if idx else None


def model_config_from_encoder(enc: EncoderConfig) -> ModelConfig:
    """The ``model.*`` (preset bert/vit) for an encoder config: the inverse of
    ``dist_llm.models.encoder_config``, so HF BERT/ViT directories plug into ``model.init_from``
    and our bert/vit checkpoints into ``dist-llm export``."""
    return ModelConfig(preset=str(enc.arch.value if hasattr(enc.arch, "value") else enc.arch),
                       n_layers=enc.n_layers, n_heads=enc.n_heads, d_model=enc.d_model,
                       d_ff=enc.d_ff or 4 * enc.d_model, dropout=enc.dropout, norm_eps=enc.norm_eps,
                       init_std=enc.init_std, bias=bool(enc.qkv_bias), vocab_size=enc.vocab_size,
                       max_seq_len=enc.max_seq_len, type_vocab_size=enc.type_vocab_size,
                       image_size=enc.image_size, patch_size=enc.patch_size, num_channels=enc.num_channels,
                       num_classes=enc.num_classes)


def fill_missing_heads(state: Dict[str, torch.Tensor], missing: Sequence[str], cfg: ModelConfig,
                       source: str) -> Dict[str, torch.Tensor]:
    """Task heads a base-model save lacks (``BertModel``, ``ViTModel``) start from a fresh init
    drawn from a fixed seed, so every rank gets the same tensors without a broadcast."""
    if not missing:
        return state
    from dist_llm.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = build_model(cfg).state_dict()
    import logging

    logging.getLogger(__name__).warning("%s: no %s in the checkpoint; those heads start from a fresh init",
                                        source, ", ".join(missing))
    return {**state, **{k: fresh[k].clone() for k in missing}}
