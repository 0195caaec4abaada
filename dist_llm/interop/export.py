"""Export one of our checkpoints as a Hugging Face model directory.

Reads the checkpoint's full ``model.safetensors`` (every engine writes the full plain weights
there, ZeRO-3 and Megatron TP/PP included; see ``checkpoint/manager.py``), maps it with the
preset's adapter and writes ``model.safetensors``, ``config.json``, ``generation_config.json`` and
the tokenizer files, into ``<out>.tmp`` first and then renamed, so a crash leaves no half export.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from dist_llm.config.choices import DECODER_PRESETS
from dist_llm.config.schema import ModelConfig
from dist_llm.interop import InteropError, adapter_for_preset
from dist_llm.interop.init_from import load_source_weights, locate, source_tokenizer
from dist_llm.models.gpt import resolve_model_config




def _resolved(cfg: ModelConfig) -> ModelConfig:
    """Derived fields filled in and validated: the decoder's resolver, the encoders' own checks."""
    if str(cfg.preset) in DECODER_PRESETS:
        return resolve_model_config(cfg)
    from dist_llm.models import encoder_config

    try:
        encoder_config(cfg).validate()
    except ValueError as e:
        raise InteropError(f"dist-llm export: the checkpoint's model config is not a valid encoder: {e}") from e
    return cfg


def _tokenizer_from_path(path: str):
    from dist_llm.data.tokenizer import HFTokenizer
    from dist_llm.interop.tokenizer import tokenizer_from_hf_dir

    p = Path(path)
    if p.is_dir():
        return tokenizer_from_hf_dir(p)
    if p.is_file():
        return HFTokenizer(p)
    raise InteropError(f"--tokenizer {path}: neither a Hugging Face tokenizer directory nor a tokenizer.json file")


def _special_ids(tok) -> Dict[str, Optional[int]]:
    ids = getattr(tok, "special_ids", {}) if tok is not None else {}
    return {f"{k}_token_id": ids.get(k) for k in ("bos", "eos", "pad")}


def _merged_lora(src: Any, weights: Dict[str, Any]) -> Dict[str, Any]:
    """A LoRA run's weights with the adapters merged in (fp32) and task heads dropped; others as they are."""
    from dist_llm.models.lora import ADAPTER_CONFIG, adapter_state_dict, is_adapter_param, load_adapter, merge_lora

    if not any(is_adapter_param(k) for k in weights):
        return weights
    if not (Path(src.path) / ADAPTER_CONFIG).is_file():
        raise InteropError(f"{src.path} holds LoRA tensors but no {ADAPTER_CONFIG}; re-save the checkpoint")
    _, spec = load_adapter(src.path)
    merged = merge_lora(weights, adapter_state_dict(weights, spec), spec)
    return {k: v for k, v in merged.items() if not k.startswith("cls_head.")}


def export_hf(source: str, out_dir: str, tokenizer: Optional[str] = None, with_tokenizer: bool = True,
              overwrite: bool = False) -> Dict[str, Any]:
    """Write the Hugging Face export of ``source`` (a checkpoint, ``best/`` or run dir) to ``out_dir``."""
    from safetensors.torch import save_file

    from dist_llm.interop.tokenizer import export_tokenizer

    src = locate(source, what="dist-llm export source")
    if src.kind != "ours":
        raise InteropError(f"{source} is already a Hugging Face directory ({src.config_file}); nothing to export")
    cfg = _resolved(src.model_cfg)
    adapter = adapter_for_preset(str(cfg.preset))
    if str(cfg.preset) == "vit":  # images: no tokenizer, nothing to generate
        with_tokenizer, tokenizer = False, None
    tok = _tokenizer_from_path(tokenizer) if tokenizer else (source_tokenizer(src) if with_tokenizer else None)
    if with_tokenizer and tok is None:
        raise InteropError(f"no tokenizer found for {source} (its config's data paths and model.init_from have "
                           f"none from here); pass --tokenizer <HF dir | tokenizer.json> or --no-tokenizer")
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise InteropError(f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.vocab_size} "
                           f"in {src.config_file}: it is not this model's tokenizer")
    out, tmp = Path(out_dir), Path(f"{out_dir}.tmp")
    if out.exists() and not overwrite:
        raise InteropError(f"--out {out} exists; remove it or pass --force")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    hf_state = adapter.state_dict_to_hf(_merged_lora(src, load_source_weights(src, cfg)), cfg)
    save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    specials = _special_ids(tok)
    hf_config = {**adapter.config_to_hf(cfg), **specials, "dtype": "float32"}
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    if str(cfg.preset) in DECODER_PRESETS:  # encoders do not generate: no generation_config.json
        generation = {**specials, "transformers_version": hf_config.get("transformers_version")}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True))
    if tok is not None:
        export_tokenizer(tok, tmp, model_max_length=cfg.max_seq_len)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {"out": str(out), "architecture": adapter.ARCHITECTURE, "source": str(src.path),
            "tensors": len(hf_state), "parameters": sum(t.numel() for t in hf_state.values()),
            "tokenizer": getattr(tok, "kind", None)}
