"""Typed configs of the compression commands (``dist-llm prune``, ``dist-llm quantize``) and of the
shared perplexity evaluation. The CLIs fill them from flags; ``validate()`` runs before any model
is loaded and names the flag to fix. Imports nothing of ours (see shared/notes/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional


class CompressConfigError(ValueError):
    pass


class PruneMethod(str, Enum):
    UNSTRUCTURED = "unstructured"  # magnitude, element-wise zeros kept by masks
    STRUCTURED = "structured"  # whole attention heads / MLP channels removed: a smaller config


class PruneScope(str, Enum):
    GLOBAL = "global"  # one magnitude threshold over all prunable weights
    PER_LAYER = "per_layer"  # each weight matrix pruned to the target sparsity


class Importance(str, Enum):
    L2 = "l2"  # squared L2 norm of the head's / channel's weights (no data needed)
    TAYLOR = "taylor"  # first-order Taylor |w * dL/dw| summed over a few training batches


class QuantMode(str, Enum):
    WEIGHT_ONLY = "weight_only"  # int8 weights, float activations
    DYNAMIC = "dynamic"  # int8 weights and per-token int8 activations quantized at run time


@dataclass
class EvalLMConfig:
    """Perplexity on a validation split of our shards."""
    val_dir: Optional[str] = None  # None = the source run's validation split
    seq_len: Optional[int] = None  # None = the source run's train.seq_len
    batch_size: int = 8
    max_batches: int = 16  # 0 = the whole split
    device: str = "cpu"


@dataclass
class FinetuneConfig:
    """Short in-process recovery fine-tune (plain AdamW, single process, masks re-applied)."""
    steps: int = 0  # 0 = no fine-tune
    lr: float = 3e-4
    batch_size: int = 8
    weight_decay: float = 0.0
    train_dir: Optional[str] = None  # None = the source run's first training source
    seed: int = 0


@dataclass
class PruneConfig:
    source: str = "???"
    out: str = "???"
    method: PruneMethod = PruneMethod.UNSTRUCTURED
    sparsity: float = 0.5  # unstructured: fraction of prunable weights set to zero
    scope: PruneScope = PruneScope.GLOBAL
    head_fraction: float = 0.0  # structured: fraction of heads (kv groups for GQA) removed per layer
    mlp_fraction: float = 0.0  # structured: fraction of MLP channels removed per layer
    importance: Importance = Importance.L2
    importance_batches: int = 4  # taylor: training batches the gradients are taken over
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalLMConfig = field(default_factory=EvalLMConfig)
    overwrite: bool = False


@dataclass
class QuantizeConfig:
    source: str = "???"
    out: str = "???"
    mode: QuantMode = QuantMode.WEIGHT_ONLY
    eval: EvalLMConfig = field(default_factory=EvalLMConfig)
    overwrite: bool = False


def _check(ok: bool, flag: str, value, fix: str) -> None:
    if not ok:
        raise CompressConfigError(f"{flag}={value!r}: {fix}")


def validate_eval(cfg: EvalLMConfig) -> None:
    _check(cfg.batch_size >= 1, "--eval-batch-size", cfg.batch_size, "must be >= 1")
    _check(cfg.max_batches >= 0, "--eval-batches", cfg.max_batches, "must be >= 0 (0 = whole split)")
    _check(cfg.seq_len is None or cfg.seq_len >= 1, "--seq-len", cfg.seq_len, "must be >= 1")
    _check(cfg.device in ("cpu", "cuda") or cfg.device.startswith("cuda:"), "--device", cfg.device,
           "use cpu or cuda[:N]")


def validate_prune(cfg: PruneConfig) -> None:
    if cfg.method == PruneMethod.UNSTRUCTURED:
        _check(0.0 < cfg.sparsity < 1.0, "--sparsity", cfg.sparsity, "must be in (0, 1)")
    else:
        _check(0.0 <= cfg.head_fraction < 1.0, "--heads", cfg.head_fraction, "must be in [0, 1)")
        _check(0.0 <= cfg.mlp_fraction < 1.0, "--mlp", cfg.mlp_fraction, "must be in [0, 1)")
        _check(cfg.head_fraction > 0 or cfg.mlp_fraction > 0, "--heads/--mlp", (cfg.head_fraction, cfg.mlp_fraction),
               "structured pruning needs --heads and/or --mlp > 0")
        _check(cfg.importance_batches >= 1, "--importance-batches", cfg.importance_batches, "must be >= 1")
    ft = cfg.finetune
    _check(ft.steps >= 0, "--finetune-steps", ft.steps, "must be >= 0")
    _check(ft.lr > 0, "--finetune-lr", ft.lr, "must be > 0")
    _check(ft.batch_size >= 1, "--finetune-batch-size", ft.batch_size, "must be >= 1")
    validate_eval(cfg.eval)


def validate_quantize(cfg: QuantizeConfig) -> None:
    _check(isinstance(cfg.mode, QuantMode), "--mode", cfg.mode, "use weight_only or dynamic")
    validate_eval(cfg.eval)
