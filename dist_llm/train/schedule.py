"""Learning-rate schedule: linear warmup, then cosine or linear decay to a floor.

A pure function of the step, so a resumed run needs no scheduler state beyond the step itself.
"""
from __future__ import annotations

import math

from dist_llm.config.schema import OptimConfig


def lr_at(step: int, opt: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if opt.warmup_steps > 0 and step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.decay == "constant":
        return opt.lr
    decay_steps = opt.decay_steps if opt.decay_steps is not None else max(max_steps - opt.warmup_steps, 1)
    progress = min(max(step - opt.warmup_steps, 0) / max(decay_steps, 1), 1.0)
    if opt.decay == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        factor = 1.0 - progress
    return opt.min_lr + (opt.lr - opt.min_lr) * factor
