"""Helpers shared by the architecture adapters."""
from __future__ import annotations

from typing import Any, Dict, Iterable

import torch

from dist_llm.interop import InteropError


def require(cond: bool, source: str, field: str, value: Any, fix: str) -> None:
    if not cond:
        raise InteropError(f"{source}: {field}={value!r} is not supported by dist-llm's model: {fix}")


def strip_prefix(sd: Dict[str, torch.Tensor], prefixes: Iterable[str]) -> Dict[str, torch.Tensor]:
    """Drop a leading base-model prefix (``transformer.``/``model.``) so the keys of a bare
    ``GPT2Model``/``LlamaModel`` and of its ``*LMHeadModel`` read the same."""
    out = {}
    for key, value in sd.items():
        for p in prefixes:
            if key.startswith(p):
                key = key[len(p):]
                break
        out[key] = value
    return out


def take(sd: Dict[str, torch.Tensor], key: str, source: str = "state dict") -> torch.Tensor:
    if key not in sd:
        raise InteropError(f"{source}: tensor {key!r} is missing (got {len(sd)} tensors, e.g. "
                           f"{sorted(sd)[:4]}); the weights do not match the config's architecture")
    return sd[key]


def owned(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Contiguous, non-aliasing copies (safetensors refuses tensors that share memory)."""
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}
