"""The values every rank derives from a validated config, computed once.

:func:`dist_llm.config.validate.validate` returns a :class:`RunPlan`; the trainer, the data
loader and the DeepSpeed engine read world size, data-parallel size, gradient accumulation and
the run directory from it instead of each recomputing them.

This module imports nothing of ours (see shared/notes/architecture.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


def grad_accum_steps(global_batch_size: int, micro_batch_size: int, dp: int) -> int:
    """Micro-batches per rank per optimizer step: global = micro * grad_accum * dp."""
    return global_batch_size // max(micro_batch_size * dp, 1)


def run_dir_for(output_dir: str, name: str, job_id: Optional[str]) -> Path:
    """``<output_dir>/<name>[-<job id>]``: the same on every rank and after a requeue, never a
    per-rank timestamp."""
    run = name if not job_id else f"{name}-{re.sub(r'[^A-Za-z0-9_.-]', '_', job_id)}"
    return Path(output_dir) / run


@dataclass(frozen=True)
class RunPlan:
    world: int
    dp: int
    grad_accum: int
    tokens_per_step: int  # global_batch_size * seq_len
    run_dir: Path
    job_id: Optional[str] = None


def make_plan(cfg, world: int, job_id: Optional[str] = None) -> RunPlan:
    """The plan of a (validated) ``JobConfig`` on ``world`` ranks."""
    tr, par = cfg.train, cfg.parallel
    dp = world // max(par.tp * par.pp, 1)
    return RunPlan(world=world, dp=dp,
                   grad_accum=grad_accum_steps(tr.global_batch_size, tr.micro_batch_size, dp),
                   tokens_per_step=tr.global_batch_size * tr.seq_len,
                   run_dir=run_dir_for(cfg.output_dir, cfg.name, job_id), job_id=job_id)
