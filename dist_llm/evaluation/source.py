"""What ``dist-llm eval`` evaluates: a model and the job config it belongs to.

Sources (classified by :func:`dist_llm.interop.init_from.locate`): our run directory (its latest
checkpoint), a ``step-N/`` checkpoint or ``best/`` (config from the manifest / run directory), or a
Hugging Face ``save_pretrained`` directory (architecture from ``config.json``, weights through
the interop adapter; the data must then be named with ``data.val=<shards>``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List

import torch

from dist_llm.config.schema import JobConfig
from dist_llm.interop.init_from import Source, load_into, load_source_weights, locate

_KIND_FOR_PRESET = {"bert": "mlm_nsp", "vit": "classify"}


def job_config(src: Source, overrides: List[str]) -> JobConfig:
    """The source run's job config (defaults for a Hugging Face dir) with ``overrides`` applied."""
    from omegaconf import OmegaConf

    from dist_llm.config.store import to_job_config

    base = OmegaConf.structured(JobConfig)
    run = dict(src.run_config or {})
    if src.kind == "hf":
        from dist_llm.config.store import config_to_dict

        run = {"model": config_to_dict(src.model_cfg),
               "task": {"kind": _KIND_FOR_PRESET.get(str(src.model_cfg.preset), "pretrain")}}
    known = set(base.keys())
    node = OmegaConf.merge(base, {k: v for k, v in run.items() if k in known and k != "hydra"},
                           OmegaConf.from_dotlist(overrides))
    cfg = to_job_config(node)
    if src.kind == "hf":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=None))
    return cfg


def load_model(src: Source, cfg: JobConfig, task) -> torch.nn.Module:
    """The plain model of ``task`` with the source's weights, float32, eval mode."""
    model = task.build_model(cfg)
    state = load_source_weights(src, cfg.model)
    if "lm_head.weight" in state and "lm_head.weight" not in model.state_dict():
        # load_source_weights re-ties a GPT head whenever tok_emb.weight is present; encoders
        # (BERT's tok_emb) have no lm_head of that name
        del state["lm_head.weight"]
    load_into(model, state, str(src.path))
    return model.float().eval()


def val_split(cfg: JobConfig, split: str) -> str:
    """The shard directory to evaluate: ``data.val`` (or the train source) or the embedded set's."""
    data = cfg.data
    if split == "val" and data.val:
        return str(data.val)
    if split == "train" and data.train:
        return str(data.train[0].path)
    if data.build_embedded:
        return str(Path(data.embedded_dir) / split)
    raise ValueError(f"the source's config names no {split} data: pass data.val=<shard dir>")


def locate_source(path: str) -> Source:
    return locate(path, what="dist-llm eval source")


def describe(src: Source) -> Dict[str, Any]:
    return {"source": str(src.path), "source_kind": src.kind}


__all__ = ["job_config", "load_model", "locate_source", "val_split", "describe"]
