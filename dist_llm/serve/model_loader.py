"""Find, verify and load the model and tokenizer that ``dist-llm serve`` puts behind the API.

Accepted paths (see dist_llm/checkpoint/manager.py for the layout):

* a committed checkpoint ``.../checkpoints/step-N/``: ``model.safetensors`` checked against the
  sha256 in its ``manifest.json``, whose ``config`` gives the model shape and the training data;
* ``<run>/best/``: its weights, the config from the run's latest committed checkpoint;
* a run directory: its ``checkpoints/latest``;
* a Hugging Face directory (``config.json`` with ``model_type``, no manifest; e.g. from
  ``dist-llm export --format hf``): :func:`load_hf_export`, through dist_llm/interop.

The tokenizer is the one the model was trained with: the ``tokenizer`` meta of the first training
split's ``manifest.json`` (as ``train/run.py`` does for its end-of-run sample), or the dataset
named by ``serve.tokenizer_dir``. Nothing is unpickled: weights are safetensors.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from dist_llm.config.choices import DECODER_PRESETS
from dist_llm.config.schema import ModelConfig
from dist_llm.config.serve_schema import ServeConfig


class ModelLoadError(ValueError):
    pass


@dataclass
class LoadedModel:
    """Everything the server needs from a model: what to run and how to turn text into ids."""

    model: Any  # an nn.Module in eval mode taking [B, T] ids
    tokenizer: Any  # encode(str) -> ids, decode(ids) -> str, eos_id, pad_id, vocab_size
    name: str  # the id clients pass as `model`
    max_seq_len: int  # context length: prompt + new tokens must fit
    vocab_size: int
    source: str  # where it came from, for /v1/models and logs

    @property
    def stop_token_ids(self) -> Tuple[int, ...]:
        eos = getattr(self.tokenizer, "eos_id", None)
        return () if eos is None else (int(eos),)

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_id", None)
        return 0 if pad is None else int(pad)


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def _latest_checkpoint(run_dir: Path) -> Path:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        raise ModelLoadError(f"{run_dir} has no checkpoints/latest: pass a committed checkpoint directory "
                             f"(checkpoints/step-N with manifest.json) or a run directory that has one")
    ckpt = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (ckpt / "manifest.json").is_file():
        raise ModelLoadError(f"{pointer} points at {ckpt.name}, which has no manifest.json (not committed); "
                             f"pass an older checkpoint directory explicitly")
    return ckpt


def resolve_checkpoint(path: Path) -> Tuple[Path, Dict[str, Any], Optional[str]]:
    """(weights file, the checkpoint manifest with the training config, expected sha256 or None)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"serve: {path} is not a directory; pass a checkpoint (checkpoints/step-N), "
                             f"a run's best/ directory, a run directory or a Hugging Face export directory")
    if (path / "manifest.json").is_file():
        manifest = _read_json(path / "manifest.json")
        if "config" not in manifest or "files" not in manifest:
            raise ModelLoadError(f"{path / 'manifest.json'} is not a dist-llm checkpoint manifest (no config/files)")
        return path / "model.safetensors", manifest, manifest["files"].get("model.safetensors")
    if (path / "model.safetensors").is_file() and (path / "info.json").is_file():  # <run>/best
        manifest = _read_json(_latest_checkpoint(path.parent) / "manifest.json")
        return path / "model.safetensors", manifest, None
    if (path / "checkpoints").is_dir():
        return resolve_checkpoint(_latest_checkpoint(path))
    raise ModelLoadError(f"serve: {path} is neither a checkpoint (manifest.json), a best/ directory "
                         f"(model.safetensors + info.json), a run directory (checkpoints/latest) nor a "
                         f"Hugging Face export (config.json with model_type)")


def is_hf_export(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file() or (Path(path) / "manifest.json").is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def load_hf_export(path: Path, cfg: ServeConfig) -> LoadedModel:
    """A Hugging Face directory (``dist-llm export --format hf`` or any ``save_pretrained`` GPT-2 /
    Llama with safetensors weights): the interop adapters map config and weights onto our GPT, the
    tokenizer comes from its ``tokenizer.json`` (or ``serve.tokenizer_dir``), and the chat template
    from ``tokenizer_config.json`` / ``chat_template.jinja`` when present."""
    from dist_llm.interop import InteropError
    from dist_llm.interop.init_from import check_vocab, load_source_weights, locate, source_tokenizer
    from dist_llm.interop.tokenizer import tokenizer_from_hf_dir, tokenizer_with_chat_template
    from dist_llm.models import build_model

    try:
        src = locate(str(path), what="serve model path")
        mcfg = src.model_cfg
        if str(mcfg.preset) not in DECODER_PRESETS:
            raise ModelLoadError(f"serve: {path} is a {src.hf_model_type} model; only causal LMs (gpt2, llama) "
                                 f"generate text")
        tok_dir = Path(cfg.tokenizer_dir) if cfg.tokenizer_dir else Path(path)
        tok = tokenizer_from_hf_dir(tok_dir) if cfg.tokenizer_dir else source_tokenizer(src)
        if tok is None:
            raise ModelLoadError(f"serve: {path} has no tokenizer.json; export with its tokenizer or pass "
                                 f"--tokenizer-dir <Hugging Face tokenizer directory>")
        check_vocab(tok, mcfg, str(tok_dir))
        model = build_model(mcfg)
        model.load_state_dict(load_source_weights(src, mcfg), strict=True)
    except (InteropError, RuntimeError) as e:
        raise ModelLoadError(f"serve: cannot load the Hugging Face directory {path}: {e}") from e
    model.to(_pick_device(cfg.device)).eval()
    tok = tokenizer_with_chat_template(tok, tok_dir)
    name = cfg.model_name or Path(path).resolve().name
    return LoadedModel(model, tok, name, mcfg.max_seq_len, mcfg.vocab_size, str(Path(path).resolve()))


def model_config_from(manifest: Dict[str, Any]) -> ModelConfig:
    raw = dict(manifest["config"].get("model") or {})
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in raw.items() if k in known})


def _tokenizer_candidates(manifest: Dict[str, Any], run_hint: Path, override: Optional[str]) -> List[Path]:
    """Split directories whose manifest.json may hold the tokenizer meta, most specific first."""
    if override:
        base = Path(override)
        return [base / "train", base]
    data = manifest["config"].get("data") or {}
    paths = [Path(src["path"]) for src in data.get("train") or [] if src.get("path")]
    if not paths and data.get("embedded_dir"):
        paths = [Path(data["embedded_dir"]) / "train"]
    out: List[Path] = []
    for p in paths:  # relative paths were relative to the training job's working directory
        out += [p] if p.is_absolute() else [p, *(parent / p for parent in run_hint.parents)]
    return out


def load_tokenizer_for(manifest: Dict[str, Any], run_hint: Path, override: Optional[str] = None):
    from dist_llm.data import load_tokenizer

    tried = _tokenizer_candidates(manifest, run_hint, override)
    for split in tried:
        if (split / "manifest.json").is_file():
            meta = _read_json(split / "manifest.json").get("tokenizer") or {"kind": "byte"}
            return load_tokenizer(meta, split.parent)
    raise ModelLoadError(f"serve: cannot find the training data's manifest.json (tokenizer) for {run_hint}; "
                         f"tried {[str(t) for t in tried[:6]]}: pass --tokenizer-dir <dataset dir with "
                         f"train/manifest.json>")


def _pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("serve.device=cuda but no CUDA device is visible; use serve.device=cpu")
    return torch.device(str(name))


def load_checkpoint(path: Path, cfg: ServeConfig) -> LoadedModel:
    from safetensors.torch import load_file

    from dist_llm.fileio import sha256_file
    from dist_llm.models import build_model

    weights, manifest, want_sha = resolve_checkpoint(path)
    if not weights.is_file():
        raise ModelLoadError(f"{weights} is missing: this checkpoint has no full weights file")
    if want_sha is not None and sha256_file(weights) != want_sha:
        raise ModelLoadError(f"{weights} does not match its sha256 in manifest.json (corrupt or partially "
                             f"copied); serve another checkpoint")
    mcfg = model_config_from(manifest)
    model = build_model(mcfg)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise ModelLoadError(f"{weights} does not fit the model in its manifest (missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]})")
    model.to(_pick_device(cfg.device)).eval()
    tok = load_tokenizer_for(manifest, weights.parent, cfg.tokenizer_dir)
    if tok.vocab_size > mcfg.vocab_size:
        raise ModelLoadError(f"the tokenizer has {tok.vocab_size} tokens but the model only {mcfg.vocab_size}: "
                             f"pass the dataset it was trained on with --tokenizer-dir")
    name = cfg.model_name or default_model_name(Path(path))
    return LoadedModel(model, tok, name, mcfg.max_seq_len, mcfg.vocab_size, str(Path(path).resolve()))


def default_model_name(path: Path) -> str:
    """``<run>`` for a run dir, ``<run>/step-N`` or ``<run>/best`` for a checkpoint: readable, stable."""
    path = Path(path).resolve()
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/{path.name}"
    if path.name == "best":
        return f"{path.parent.name}/best"
    return path.name


def load_for_serving(cfg: ServeConfig,
                     hf_loader: Optional[Callable[[Path, ServeConfig], LoadedModel]] = None) -> LoadedModel:
    """The model named by ``cfg.model_path``, on its device, in eval mode."""
    path = Path(cfg.model_path)
    if is_hf_export(path):
        return (hf_loader or load_hf_export)(path, cfg)
    return load_checkpoint(path, cfg)
