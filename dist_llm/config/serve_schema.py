"""Typed configuration of ``dist-llm serve`` (one dataclass, choices as enums).

The CLI fills it from flags (``--port 8001``) and from ``serve.<field>=<value>`` overrides;
:func:`validate_serve_config` checks it before any model is loaded or any port is bound.
This module imports nothing of ours outside ``config/`` (see shared/notes/architecture.md).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from dist_llm.config.choices import Device, ServeLogLevel


class ServeBackend(str, enum.Enum):
    # lower-case names: OmegaConf matches overrides (serve.backend=ray) against member names
    local = "local"  # uvicorn in this process, one model, one batching worker thread
    ray = "ray"  # Ray Serve: the same FastAPI app in `ray_replicas` replicas


@dataclass
class ServeConfig:
    model_path: str = "???"  # a checkpoint (step-N/, best/), a run directory, or a Hugging Face export dir
    model_name: Optional[str] = None  # the id clients pass as `model`; None = the directory's name
    tokenizer_dir: Optional[str] = None  # dataset dir whose train/manifest.json names the tokenizer; None = from the run's config
    host: str = "127.0.0.1"  # localhost only by default; 0.0.0.0 exposes the API to the network
    port: int = 8000
    device: Device = Device.auto  # auto = cuda when available
    max_batch_size: int = 8  # requests run together in one generate call
    batch_timeout_ms: float = 10.0  # how long the first request of a batch waits for company
    max_queue: int = 64  # requests waiting beyond this get 503
    max_prompt_tokens: int = 0  # 0 = the model's context length
    max_tokens_limit: int = 256  # the largest max_tokens a request may ask for
    default_max_tokens: int = 16  # max_tokens when a request leaves it out (OpenAI's completions default)
    request_timeout_s: float = 120.0  # a request not answered by then gets 504
    backend: ServeBackend = ServeBackend.local
    ray_address: Optional[str] = None  # an existing cluster (e.g. 127.0.0.1:6379); None = start a local one
    ray_replicas: int = 1
    ray_cpus_per_replica: float = 1.0
    ray_gpus_per_replica: float = 0.0
    log_level: ServeLogLevel = ServeLogLevel.info


def validate_serve_config(cfg: ServeConfig) -> None:
    """Raise ``ValueError`` naming the field and the fix for the first bad value."""
    def bad(field: str, why: str) -> None:
        raise ValueError(f"serve.{field}={getattr(cfg, field)!r}: {why}")

    if not cfg.model_path or cfg.model_path == "???":
        bad("model_path", "give the checkpoint, run directory or export directory to serve")
    if not 0 <= cfg.port <= 65535:
        bad("port", "use a TCP port in 1..65535 (0 = any free port)")
    if cfg.device not in Device.values():
        bad("device", f"use {', '.join(Device.values())}")
    for name in ("max_batch_size", "max_queue", "max_tokens_limit", "default_max_tokens", "ray_replicas"):
        if getattr(cfg, name) < 1:
            bad(name, "must be >= 1")
    if cfg.batch_timeout_ms < 0:
        bad("batch_timeout_ms", "must be >= 0 (0 = run whatever is queued at once)")
    if cfg.max_prompt_tokens < 0:
        bad("max_prompt_tokens", "must be >= 0 (0 = the model's context length)")
    if cfg.default_max_tokens > cfg.max_tokens_limit:
        bad("default_max_tokens", f"must be <= serve.max_tokens_limit={cfg.max_tokens_limit}")
    if cfg.request_timeout_s <= 0:
        bad("request_timeout_s", "must be > 0 seconds")
    if cfg.ray_cpus_per_replica < 0 or cfg.ray_gpus_per_replica < 0:
        bad("ray_cpus_per_replica", "ray_cpus_per_replica and ray_gpus_per_replica must be >= 0")
    if cfg.log_level not in ServeLogLevel.values():
        bad("log_level", f"use one of {', '.join(ServeLogLevel.values())}")
