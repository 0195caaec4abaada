"""``dist-llm serve <checkpoint | run dir | export dir> [--host 127.0.0.1] [--port N] [--ray] [serve.k=v ...]``

Flags cover the common settings; every field of :class:`ServeConfig` can also be set as
``serve.<field>=<value>`` (type-checked by OmegaConf against the dataclass, e.g.
``serve.backend=ray serve.ray_replicas=2``).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import List, Optional

from dist_llm.config.choices import Device
from dist_llm.config.serve_schema import ServeBackend, ServeConfig, validate_serve_config

# flag -> ServeConfig field (argparse dest is the field name)
_FLAGS = [
    ("--host", str, "address to bind (default 127.0.0.1: this machine only)"),
    ("--port", int, "TCP port (default 8000)"),
    ("--model-name", str, "the model id clients pass (default: the directory's name)"),
    ("--tokenizer-dir", str, "dataset dir with train/manifest.json, when the run's data has moved"),
    ("--device", str, " | ".join(Device.values())),
    ("--max-batch-size", int, "requests generated together (default 8)"),
    ("--batch-timeout-ms", float, "how long a batch waits to fill (default 10)"),
    ("--max-queue", int, "waiting requests beyond this get 503 (default 64)"),
    ("--max-prompt-tokens", int, "prompt length limit (default 0 = the model's context)"),
    ("--max-tokens-limit", int, "largest max_tokens a request may ask for (default 256)"),
    ("--request-timeout-s", float, "unanswered requests get 504 after this (default 120)"),
    ("--ray-address", str, "Ray cluster to deploy on (default: RAY_ADDRESS or a new local one)"),
    ("--ray-replicas", int, "Ray Serve replicas (default 1)"),
    ("--log-level", str, "uvicorn log level (default info)"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-llm serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_path", help="checkpoint (checkpoints/step-N), best/, run dir, or Hugging Face export dir")
    for flag, typ, help_ in _FLAGS:
        p.add_argument(flag, type=typ, default=None, help=help_)
    p.add_argument("--ray", action="store_true", help="deploy with Ray Serve (same as serve.backend=ray)")
    p.add_argument("overrides", nargs="*", help="serve.<field>=<value> overrides")
    return p


def parse_serve_config(argv: List[str]) -> ServeConfig:
    """Flags and ``serve.k=v`` overrides -> a validated :class:`ServeConfig` (raises ValueError)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    args = build_parser().parse_intermixed_args(argv)  # overrides may follow flags
    bad = [o for o in args.overrides if not o.startswith("serve.") or "=" not in o]
    if bad:
        raise ValueError(f"dist-llm serve: cannot read {bad}: overrides look like serve.<field>=<value>, "
                         f"e.g. serve.max_batch_size=16 (see dist-llm serve --help)")
    cfg = ServeConfig(model_path=args.model_path)
    for f in dataclasses.fields(ServeConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name != "model_path":
            setattr(cfg, f.name, value)
    if args.ray:
        cfg.backend = ServeBackend.ray
    try:
        node = OmegaConf.merge(OmegaConf.structured(cfg),
                               OmegaConf.from_dotlist([o[len("serve."):] for o in args.overrides]))
        cfg = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ValueError(f"dist-llm serve: bad override serve.{key}: {getattr(e, 'msg', e)}") from None
    validate_serve_config(cfg)
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    try:
        cfg = parse_serve_config(list(sys.argv[1:] if argv is None else argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.backend == ServeBackend.ray:
        from dist_llm.launch.ray_connect import RayUnreachableError
        from dist_llm.serve.ray_backend import run_ray

        try:
            return run_ray(cfg)
        except RayUnreachableError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    from dist_llm.serve.server import run_local

    return run_local(cfg)
