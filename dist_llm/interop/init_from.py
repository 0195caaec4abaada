"""``model.init_from``: start a run from a Hugging Face directory or from one of our checkpoints.

Sources:

* a directory written by ``transformers``' ``save_pretrained``: ``config.json`` plus
  ``model.safetensors`` (or a sharded ``model.safetensors.index.json``); pickled
  ``pytorch_model.bin`` weights are refused, since unpickling can run code;
* our checkpoints: ``checkpoints/step-N/`` (``manifest.json``), a run directory (its latest
  checkpoint), or ``best/`` (config from the run directory around it).

Explicit overrides: the architecture fields (``ARCH_FIELDS``) come from the source. A field of the
user's ``model`` config that differs from the ``ModelConfig`` default *and* from the source is an
error naming both values; a field at its default takes the source's value. So a value explicitly
set equal to the default cannot be told apart from "unset" and is silently replaced: use
``model=pretrained`` (every field at its default) and override only what really must match.
Dropout, init and activation checkpointing are training choices and stay the user's.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from dist_llm.config.choices import DECODER_PRESETS
from dist_llm.config.schema import ModelConfig
from dist_llm.interop import InteropError, adapter_for_model_type

ARCH_FIELDS = ("preset", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_ff", "max_seq_len", "vocab_size",
               "bias", "tie_embeddings", "norm_eps", "rope_theta", "head_dim",
               "type_vocab_size", "image_size", "patch_size", "num_channels", "num_classes")  # bert/vit


@dataclasses.dataclass
class Source:
    kind: str  # "hf" | "ours"
    path: Path  # the directory holding the weights
    config_file: Path  # where the architecture comes from (named in errors)
    model_cfg: ModelConfig  # architecture as found there (not merged with the user's)
    hf_model_type: Optional[str] = None
    run_config: Optional[Dict[str, Any]] = None  # our full job config dict, for our checkpoints


def model_config_from_dict(d: Dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a stored ``model`` dict; unknown keys (newer/older versions) ignored."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in d.items() if k in names})


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InteropError(f"cannot read {path}: {e}") from e


def _our_run_config(run_dir: Path) -> Optional[Dict[str, Any]]:
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        manifest = run_dir / "checkpoints" / latest.read_text().strip() / "manifest.json"
        if manifest.is_file():
            return _read_json(manifest).get("config")
    if (run_dir / "config.yaml").is_file():
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    return None


def locate(path_str: str, what: str = "model.init_from") -> Source:
    """Classify ``model.init_from`` (or another source, named by ``what`` in errors) and read its
    architecture (no weights yet)."""
    path = Path(path_str).expanduser()
    if not path.is_dir():
        raise InteropError(f"{what}={path_str!r} is not a directory; pass a Hugging Face "
                           f"save_pretrained directory or one of our checkpoint/run directories")
    if (path / "config.json").is_file():
        hf = _read_json(path / "config.json")
        model_type = hf.get("model_type")
        adapter = adapter_for_model_type(str(model_type), source=str(path / "config.json"))
        return Source("hf", path, path / "config.json", adapter.config_from_hf(hf, source=str(path / "config.json")),
                      hf_model_type=model_type)
    if not (path / "manifest.json").is_file() and (path / "checkpoints" / "latest").is_file():
        path = path / "checkpoints" / (path / "checkpoints" / "latest").read_text().strip()
    if (path / "manifest.json").is_file():
        config = _read_json(path / "manifest.json").get("config") or {}
        cfg_file = path / "manifest.json"
    elif (path / "model.safetensors").is_file() and (path / "info.json").is_file():  # best/
        config, cfg_file = _our_run_config(path.parent) or {}, path.parent / "config.yaml"
    else:
        raise InteropError(f"{what}={path_str!r}: found neither config.json (Hugging Face), manifest.json "
                           f"(our checkpoint), checkpoints/latest (our run) nor best/ weights")
    if "model" not in config:
        raise InteropError(f"{cfg_file}: no model config stored; cannot rebuild the architecture of {path}")
    return Source("ours", path, cfg_file, model_config_from_dict(config["model"]), run_config=config)


def merge_model_config(user: ModelConfig, src: Source) -> ModelConfig:
    """The source's architecture with the user's training choices; conflicting explicit values raise."""
    defaults = ModelConfig()
    updates = {}
    for name in ARCH_FIELDS:
        if not hasattr(user, name) or not hasattr(src.model_cfg, name):
            continue
        mine, theirs = getattr(user, name), getattr(src.model_cfg, name)
        if mine != getattr(defaults, name) and mine != theirs and theirs is not None:
            raise InteropError(f"model.{name}={mine!r} conflicts with {src.config_file}, which gives "
                               f"{name}={theirs!r}; drop the override (use model=pretrained) or pick another "
                               f"model.init_from")
        updates[name] = theirs if theirs is not None else mine
    return dataclasses.replace(user, **updates)


def derive_model_config(user: ModelConfig) -> ModelConfig:
    """Config only (cheap): what the launcher validates before any process starts."""
    if not user.init_from:
        return user
    return merge_model_config(user, locate(user.init_from))


def _load_hf_weights(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        out: Dict[str, torch.Tensor] = {}
        for shard in sorted(set(_read_json(index).get("weight_map", {}).values())):
            out.update(load_file(str(path / shard)))
        return out
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = (f" It has {', '.join(pickles)}: pickled weights are refused because loading them can run code; "
            f"convert once with a trusted transformers install (model.save_pretrained(dir, "
            f"safe_serialization=True))." if pickles else "")
    raise InteropError(f"{path}: no model.safetensors or model.safetensors.index.json.{hint}")


def load_source_weights(src: Source, cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Our parameter names and layout for ``cfg`` (already merged)."""
    if src.kind == "hf":
        adapter = adapter_for_model_type(str(src.hf_model_type))
        return adapter.state_dict_from_hf(_load_hf_weights(src.path), cfg, source=str(src.path))
    from safetensors.torch import load_file

    weights = src.path / "model.safetensors"
    if not weights.is_file():
        raise InteropError(f"{weights} is missing: a checkpoint saved only in the sharded Megatron format "
                           f"cannot be used as model.init_from; use a checkpoint with full weights")
    sd = load_file(str(weights))
    if (str(cfg.preset) in DECODER_PRESETS and cfg.tie_embeddings is not False
            and "lm_head.weight" not in sd and "tok_emb.weight" in sd):
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    return sd


def source_tokenizer(src: Source):
    """The tokenizer that belongs to the source, or None when it has none we can read."""
    if src.kind == "hf":
        from dist_llm.interop.tokenizer import has_hf_tokenizer, tokenizer_from_hf_dir

        return tokenizer_from_hf_dir(src.path) if has_hf_tokenizer(src.path) else None
    from dist_llm.interop.run_tokenizer import tokenizer_for_run_config

    return tokenizer_for_run_config(src.run_config or {})


def check_vocab(tok, cfg: ModelConfig, where: str) -> None:
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise InteropError(f"{where}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                           f"{cfg.vocab_size} (config.json vocab_size / model.vocab_size): ids past the "
                           f"embedding would crash; use the matching tokenizer")


def resolve_init_from(model_cfg: ModelConfig) -> Tuple[ModelConfig, Dict[str, torch.Tensor], Any]:
    """(merged ModelConfig, state dict in our names, tokenizer or None) for ``model.init_from``."""
    if not model_cfg.init_from:
        raise InteropError("resolve_init_from called without model.init_from")
    src = locate(model_cfg.init_from)
    cfg = merge_model_config(model_cfg, src)
    tok = source_tokenizer(src)
    check_vocab(tok, cfg, str(src.path))
    return cfg, load_source_weights(src, cfg), tok


def load_into(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into the plain model; a shape/name mismatch names the source."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise InteropError(f"model.init_from={source}: its weights do not fit the model: {e}") from e
    # fine-tuning adds parameters a pretrained source cannot have: a task head and LoRA adapters
    missing = [k for k in missing if not (k.startswith("cls_head.") or k.endswith((".lora_A", ".lora_B")))]
    if missing or unexpected:
        raise InteropError(f"model.init_from={source}: its weights do not fit the model: missing keys "
                           f"{missing[:5]}, unexpected keys {list(unexpected)[:5]}")


PROBE = "def main(argv):\n    return {'héllo wörld': [1, 2, 3]}  # ✓\n"


def check_data_tokenizer(tok, data_cfg, init_from: str) -> None:
    """The training shards (``data_cfg``: a DataConfig) must be tokenized like the source model
    expects: same vocabulary size and the same ids for a probe text (robust to the file being
    re-serialised by prepare). The embedded demo corpus is always byte-tokenized."""
    from dist_llm.data.tokenizer import ByteTokenizer
    from dist_llm.interop.run_tokenizer import manifest_tokenizer

    if tok is None:
        return
    sources = [(s.path, manifest_tokenizer(Path(s.path))) for s in data_cfg.train]
    if not data_cfg.train and data_cfg.build_embedded:
        sources = [(f"{data_cfg.embedded_dir} (embedded corpus)", ByteTokenizer())]
    for path, data_tok in sources:
        if data_tok is None:
            continue
        if data_tok.vocab_size != tok.vocab_size or data_tok.encode(PROBE) != tok.encode(PROBE):
            raise InteropError(
                f"the training data {path} was tokenized with a different tokenizer ({data_tok.kind}, "
                f"{data_tok.vocab_size} tokens) than model.init_from={init_from} ({tok.kind}, {tok.vocab_size} "
                f"tokens); re-prepare it with `dist-llm prepare tokenizer=file "
                f"tokenizer.path={init_from}/tokenizer.json`")
