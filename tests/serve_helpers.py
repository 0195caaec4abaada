"""Shared by the serving tests and the Ray Serve test: a tiny random-weight GPT written as a real
dist-llm checkpoint (model.safetensors + manifest.json with the config and sha256, a run's
checkpoints/latest), trained-data manifest with the byte tokenizer next to it."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dist_llm.config.schema import DataConfig, DatasetSource, JobConfig, ModelConfig
from dist_llm.config.store import config_to_dict
from dist_llm.fileio import sha256_file

# untied and a wide init: a random model whose greedy text varies (a tied one repeats its last byte)
TINY_MODEL = dict(preset="gpt2", n_layers=2, n_heads=4, d_model=64, max_seq_len=96, vocab_size=258,
                  tie_embeddings=False, init_std=0.3)


def write_tiny_checkpoint(root: Path, seed: int = 0, step: int = 2, **model_overrides) -> Path:
    """``root/run/checkpoints/step-N`` (returned) and ``root/data/{train/manifest.json}``."""
    from dist_llm.models import build_model

    data = root / "data"
    (data / "train").mkdir(parents=True, exist_ok=True)
    (data / "train" / "manifest.json").write_text(json.dumps({"tokenizer": {"kind": "byte"}, "shards": []}))
    mcfg = ModelConfig(**{**TINY_MODEL, **model_overrides})
    torch.manual_seed(seed)
    model = build_model(mcfg)
    ckpt = root / "run" / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    cfg = JobConfig(name="run", model=mcfg, data=DataConfig(train=[DatasetSource(path=str(data / "train"))]))
    manifest = {"format": "dist-llm-checkpoint/1", "step": step, "world_size": 1, "engine": "DeepSpeedEngine",
                "files": {"model.safetensors": sha256_file(ckpt / "model.safetensors")},
                "config": config_to_dict(cfg)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    (ckpt.parent / "latest").write_text(ckpt.name + "\n")
    return ckpt
