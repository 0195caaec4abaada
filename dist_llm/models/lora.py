"""Low-rank adapters (LoRA, Hu et al. 2021) as a small module of our own.

``W x`` becomes ``W x + (alpha / r) * B (A dropout(x))`` with ``A`` [r, in] (Kaiming-uniform,
as in the paper's reference code) and ``B`` [out, r] zero, so training starts exactly at the
base model. :class:`LoRALinear` *is* an ``nn.Linear`` holding the same ``weight``/``bias``
parameters, so the base state-dict keys do not change (checkpoints, export and HF interop keep
working) and the adapter adds only ``<module>.lora_A`` / ``<module>.lora_B``.

Why not ``peft``: it replaces each target with a wrapper whose base weight is renamed
(``base_layer.weight``), it finds targets through Hugging Face model conventions, and under
ZeRO-3 its ``get_peft_model_state_dict`` reads the local, partitioned (empty) tensors, which is
the known "empty adapter file" failure. Here adapters are applied to the plain model before the
engine wraps it, and engines gather them with their full-state-dict path before saving.
Nothing here knows about parallelism.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoraSpec:
    """What :func:`apply_lora` needs (mirrors ``task.lora``; kept here so models import no config)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # fnmatch patterns over module names (e.g. ``blocks.0.attn.qkv``); ``*`` crosses dots
    target_modules: List[str] = field(default_factory=lambda: ["*attn.qkv", "*attn.proj"])
    # parameters (fnmatch over parameter names) trained in full next to the adapters, e.g. a new
    # classification head: ["head.*"]
    train_also: List[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` plus a rank-``r`` update; built from an existing layer, sharing its parameters."""

    def __init__(self, base: nn.Linear, spec: LoraSpec) -> None:
        nn.Module.__init__(self)  # skip nn.Linear's allocation: weight/bias are the base's own
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scale = spec.scale
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(spec.rank, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, spec.rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale


def apply_lora(model: nn.Module, spec: LoraSpec) -> List[str]:
    """Replace every ``nn.Linear`` whose name matches ``spec.target_modules`` by a
    :class:`LoRALinear` and freeze everything but the adapters (and ``spec.train_also``).
    Returns the replaced module names; raises naming the patterns when none matches."""
    if spec.rank < 1:
        raise ValueError(f"task.lora.rank={spec.rank} must be >= 1")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
               and any(fnmatch.fnmatchcase(name, p) for p in spec.target_modules)]
    if not targets:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"task.lora.target_modules={list(spec.target_modules)} match no Linear layer of "
                         f"{type(model).__name__} (some are: {linears}); fix the patterns")
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(m, spec))
    for pname, p in model.named_parameters():
        p.requires_grad = is_adapter_param(pname) or any(fnmatch.fnmatchcase(pname, q) for q in spec.train_also)
    return [n for n, _ in targets]


def is_adapter_param(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B")) or name in ("lora_A", "lora_B")


def adapter_state_dict(state: Mapping[str, torch.Tensor], spec: LoraSpec) -> Dict[str, torch.Tensor]:
    """The adapter (and ``train_also``) tensors of a full state dict: what an adapter file holds."""
    return {k: v for k, v in state.items()
            if is_adapter_param(k) or any(fnmatch.fnmatchcase(k, q) for q in spec.train_also)}


def merge_lora(state: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor],
               spec: LoraSpec) -> Dict[str, torch.Tensor]:
    """Base weights with the adapters folded in: ``W + scale * B @ A`` computed in fp32 and cast
    back to ``W``'s dtype; ``train_also`` tensors replace the base ones; no ``lora_*`` key is left.
    ``state`` may or may not hold the adapter keys itself (a LoRA model's own state dict)."""
    out = {k: v for k, v in state.items() if not is_adapter_param(k)}
    for key, a in adapter.items():
        if key.endswith(".lora_A"):
            mod = key[: -len(".lora_A")]
            b = adapter.get(f"{mod}.lora_B")
            w = out.get(f"{mod}.weight")
            if b is None or w is None:
                raise ValueError(f"adapter tensor {key!r} has no matching {mod}.lora_B / base {mod}.weight: the "
                                 f"adapter does not belong to this model")
            delta = b.float() @ a.float()
            if tuple(delta.shape) != tuple(w.shape):
                raise ValueError(f"adapter {mod}: B@A is {tuple(delta.shape)} but {mod}.weight is {tuple(w.shape)}")
            out[f"{mod}.weight"] = (w.float() + spec.scale * delta).to(w.dtype)
        elif not key.endswith(".lora_B"):
            out[key] = a
    return out


def save_adapter(directory: Any, adapter: Mapping[str, torch.Tensor], spec: LoraSpec,
                 extra: Mapping[str, Any] = ()) -> Path:
    """``adapter.safetensors`` + ``adapter_config.json`` in ``directory`` (refuses an empty adapter)."""
    from safetensors.torch import save_file

    empty = [k for k, v in adapter.items() if v.numel() == 0]
    if not adapter or empty:
        raise ValueError(f"refusing to save an empty LoRA adapter ({empty[:3] or 'no tensors'}): under ZeRO-3 the "
                         f"parameters must be gathered first")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, str(d / ADAPTER_FILE))
    (d / ADAPTER_CONFIG).write_text(json.dumps({**asdict(spec), **dict(extra), "format": "dist-llm-lora/1"},
                                               indent=1, sort_keys=True) + "\n")
    return d / ADAPTER_FILE


def load_adapter(directory: Any) -> tuple:
    """``(tensors, LoraSpec)`` from a directory written by :func:`save_adapter`."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / ADAPTER_FILE).is_file() or not (d / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{d} holds no LoRA adapter ({ADAPTER_FILE} + {ADAPTER_CONFIG}); train with "
                                f"task.lora.rank>0 or point at the checkpoint directory that has them")
    meta = json.loads((d / ADAPTER_CONFIG).read_text())
    spec = LoraSpec(**{k: meta[k] for k in ("rank", "alpha", "dropout", "target_modules", "train_also") if k in meta})
    return load_file(str(d / ADAPTER_FILE)), spec


__all__ = ["LoraSpec", "LoRALinear", "apply_lora", "adapter_state_dict", "merge_lora", "save_adapter",
           "load_adapter", "is_adapter_param", "ADAPTER_FILE", "ADAPTER_CONFIG"]
