"""What both DeepSpeed-wrapped engines share: our config as a DeepSpeed config dict, the
weight-decay parameter groups, and the micro-batch loop of one optimizer step.

Used by :class:`~dist_llm.parallel.deepspeed_engine.DeepSpeedEngine` (plain model, ZeRO over all
ranks) and :class:`~dist_llm.parallel.megatron.zero_engine.MegatronDeepSpeedEngine` (Megatron TP
model, ZeRO over the data-parallel group).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from dist_llm.config.plan import grad_accum_steps
from dist_llm.config.schema import JobConfig
from dist_llm.parallel.engine import PhaseClock


def deepspeed_config(cfg: JobConfig, dp: int) -> Dict[str, Any]:
    tr, opt, par = cfg.train, cfg.optim, cfg.parallel
    zero: Dict[str, Any] = {"stage": par.zero_stage}
    if par.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if par.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if par.zero_stage == 3:
        # Small test models would otherwise keep every parameter unpartitioned (persistence
        # threshold) and never exercise the gather path.
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": tr.global_batch_size,
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(tr.global_batch_size, tr.micro_batch_size, dp),
        "gradient_clipping": opt.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": opt.lr, "betas": [opt.beta1, opt.beta2], "eps": opt.eps,
                       "weight_decay": opt.weight_decay,
                       # torch's AdamW on CPU: DeepSpeed's fused/CPU Adam kernels need a compiler
                       # and differ numerically; offload needs DeepSpeed's CPU Adam.
                       "torch_adam": not par.offload_optimizer},
        },
        "bf16": {"enabled": par.precision == "bf16"},
        "fp16": {"enabled": par.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """No weight decay on biases, norms and other 1-D parameters (standard GPT practice)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_micro_batches(ds_engine, optimizer, micro_batches: List[torch.Tensor], lr: float,
                        loss_fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                        clock: Optional[PhaseClock] = None) -> torch.Tensor:
    """One optimizer step over ``micro_batches`` through a DeepSpeed engine; returns the sum of
    the micro-batch losses as a float64 scalar on ``device``.

    The sum stays on the device: no host sync per micro-batch; the caller reduces it once.
    ``clock`` gets ``fwd_bwd_s`` (forward, backward and the gradient reduction DeepSpeed runs
    inside ``backward`` at the boundary) and ``optim_s`` (``step``: the optimizer, and under
    ZeRO-1/2/3 the parameter all-gather).
    """
    clock = clock or PhaseClock()
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), dtype=torch.float64, device=device)
    for mb in micro_batches:
        loss = loss_fn(mb)
        ds_engine.backward(loss)
        total += loss.detach().double()
        clock.mark("fwd_bwd_s")
        ds_engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        clock.mark("optim_s")
    return total


def global_grad_norm(ds_engine) -> float:
    """The norm of the last step's gradients before clipping (nan if DeepSpeed has none)."""
    gn = ds_engine.get_global_grad_norm()
    return float(gn) if gn is not None else math.nan


def skip_single_rank_allreduce(ds_engine, cfg: JobConfig, dp: int) -> None:
    """With one data-parallel rank, ZeRO-0 in fp32 gains nothing from DeepSpeed's gradient
    all-reduce: it flattens every gradient into a fresh buffer, all-reduces it over one rank and
    copies it back (exact, so skipping it changes no number) - about a tenth of a small model's
    step on CPU. ZeRO-1/2/3 and bf16/fp16 keep DeepSpeed's path (their optimizers own the
    reduction and the partitioned buffers)."""
    if dp == 1 and cfg.parallel.zero_stage == 0 and cfg.parallel.precision == "fp32":
        ds_engine.enable_backward_allreduce = False
