"""Read a checkpoint into a plain GPT, find its data, and write compressed checkpoints.

The output of pruning is a checkpoint directory in the layout ``CheckpointManager`` commits
(``model.safetensors`` + ``manifest.json`` with the job config and the sha256 of every file), so
``model.init_from``, ``dist-llm export`` and these commands read it like any step-N directory.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import save_file

from dist_llm.compress import CompressError
from dist_llm.config.schema import ModelConfig
from dist_llm.fileio import sha256_file, write_atomic
from dist_llm.interop import InteropError
from dist_llm.interop.init_from import load_into, load_source_weights, locate
from dist_llm.models.gpt import GPT, resolve_model_config

FORMAT = "dist-llm-checkpoint/1"


@dataclasses.dataclass
class Loaded:
    model: GPT
    cfg: ModelConfig  # resolved
    run_config: Dict[str, Any]  # the source job's config dict (data paths, train.seq_len, ...)
    path: Path  # the checkpoint directory the weights came from
    weights_bytes: int  # size of its model.safetensors


def load_checkpoint_model(source: str) -> Loaded:
    """Our checkpoint (step-N/, best/ or a run dir: its latest) or a Hugging Face directory (gpt2/llama)
    as a float32 GPT in eval mode."""
    try:
        src = locate(source, what="source")
    except InteropError as e:
        raise CompressError(str(e)) from e
    cfg = resolve_model_config(src.model_cfg)  # a Hugging Face dir works too (no run config: pass the data flags)
    model = GPT(cfg)
    try:
        load_into(model, load_source_weights(src, cfg), str(src.path))
    except InteropError as e:
        raise CompressError(str(e)) from e
    model.eval()
    weights = src.path / "model.safetensors"
    size = weights.stat().st_size if weights.is_file() else sum(p.stat().st_size for p in src.path.glob("*.safetensors"))
    return Loaded(model, cfg, src.run_config or {}, src.path, size)


def _data_dir(run_config: Dict[str, Any], split: str) -> Optional[str]:
    data = run_config.get("data") or {}
    if split == "val" and data.get("val"):
        return str(data["val"])
    if split == "train" and data.get("train"):
        return str(data["train"][0]["path"])
    if data.get("build_embedded") and data.get("embedded_dir"):
        return str(Path(data["embedded_dir"]) / split)
    return None


def data_dir(run_config: Dict[str, Any], split: str, override: Optional[str], flag: str) -> str:
    """The shard directory of ``split`` (train|val): ``override`` or the source run's own."""
    path = override or _data_dir(run_config, split)
    if path is None:
        raise CompressError(f"the source checkpoint's config names no {split} data; pass {flag} <shard dir>")
    if not (Path(path) / "manifest.json").is_file():
        raise CompressError(f"{flag}: {path} has no manifest.json (not a shard directory written by "
                            f"`dist-llm prepare`); pass {flag} <shard dir> (relative paths are from the cwd)")
    return path


def seq_len_of(run_config: Dict[str, Any], override: Optional[int], cfg: ModelConfig, val_dir: str) -> int:
    """--seq-len, else the source run's train.seq_len, else the validation shards' own."""
    from dist_llm.data import read_manifest

    seq = override or (run_config.get("train") or {}).get("seq_len") or int(read_manifest(val_dir)["seq_len"])
    if seq > cfg.max_seq_len:
        raise CompressError(f"--seq-len {seq} exceeds the model's max_seq_len={cfg.max_seq_len}")
    return int(seq)


def plain_state_dict(model: GPT) -> Dict[str, torch.Tensor]:
    """Contiguous copies; a tied LM head is left out (the loaders re-tie it), as training saves do."""
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def prepare_out(out: str, overwrite: bool) -> Tuple[Path, Path]:
    final, tmp = Path(out), Path(f"{out}.tmp")
    if final.exists() and not overwrite:
        raise CompressError(f"--out {final} exists; remove it or pass --force")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return final, tmp


def commit_out(final: Path, tmp: Path) -> Path:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def write_checkpoint(out: str, model: GPT, run_config: Dict[str, Any], note: Dict[str, Any],
                     extra: Optional[Dict[str, Dict[str, torch.Tensor]]] = None, overwrite: bool = False) -> Path:
    """``out/model.safetensors`` (+ ``extra`` safetensors files, e.g. masks) + ``manifest.json``,
    written into ``out.tmp`` and renamed, so a crash leaves no half checkpoint."""
    final, tmp = prepare_out(out, overwrite)
    save_file(plain_state_dict(model), str(tmp / "model.safetensors"), metadata={"compress": note.get("kind", "")})
    for name, tensors in (extra or {}).items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name))
    config = copy.deepcopy(run_config)
    model_cfg = dataclasses.asdict(model.cfg)
    config["model"] = model_cfg
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = {"format": FORMAT, "step": int(note.get("step", 0)), "world_size": 1, "dp": 1, "tp": 1, "pp": 1,
                "engine": "compress", "files": files, "config": config, "compress": note,
                "versions": {"torch": torch.__version__}}
    write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True, default=str))
    return commit_out(final, tmp)
