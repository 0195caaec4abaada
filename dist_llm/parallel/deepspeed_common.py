"""What both DeepSpeed-wrapped engines share: our config as a DeepSpeed config dict, the
weight-decay parameter groups, and the micro-batch loop of one optimizer step.

Used by :class:`~dist_llm.parallel.deepspeed_engine.DeepSpeedEngine` (plain model, ZeRO over all
ranks) and :class:`~dist_llm.parallel.megatron.zero_engine.MegatronDeepSpeedEngine` (Megatron TP
model, ZeRO over the data-parallel group).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from dist_llm.config.plan import grad_accum_steps
from dist_llm.config.schema import JobConfig
from dist_llm.parallel.engine import Engine, PhaseClock, accumulate


def deepspeed_config(cfg: JobConfig, dp: int) -> Dict[str, Any]:
    tr, opt, par = cfg.train, cfg.optim, cfg.parallel
    zero: Dict[str, Any] = {"stage": par.zero_stage}
    if par.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if par.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    zb = par.zero
    zero.update(reduce_bucket_size=zb.reduce_bucket_size, allgather_bucket_size=zb.allgather_bucket_size)
    if par.zero_stage == 3:
        # Persistence threshold 0 by default: small test models would otherwise keep every
        # parameter unpartitioned and never exercise the gather path.
        zero.update(stage3_prefetch_bucket_size=zb.prefetch_bucket_size,
                    stage3_param_persistence_threshold=zb.param_persistence_threshold,
                    stage3_max_live_parameters=zb.max_live_parameters,
                    stage3_max_reuse_distance=zb.max_reuse_distance)
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
                       # (a JIT build of minutes at first use) and differ numerically. Offload on a
                       # GPU needs DeepSpeed's CPU Adam; on a CPU device the states are on the
                       # host anyway, so torch's AdamW steps them there.
                       "torch_adam": not par.offload_optimizer or not torch.cuda.is_available()},
        },
        # Let offload run with torch's AdamW where there is no GPU (see above).
        "zero_force_ds_cpu_optimizer": torch.cuda.is_available(),
        "bf16": {"enabled": par.precision == "bf16"},
        "fp16": {"enabled": par.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def layer_index(name: str, n_layers: int) -> int:
    """Depth of a parameter for layer-wise LR decay: 0 = embeddings, i + 1 = block i, and
    ``n_layers + 1`` for everything after the blocks (final norm, heads)."""
    parts = name.split(".")
    if parts[0] in ("blocks", "layers") and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1]) + 1
    if parts[0] in ("tok_emb", "pos_emb", "type_emb", "emb_norm"):
        return 0
    return n_layers + 1


def param_groups(model: nn.Module, weight_decay: float, layer_lr_decay: float = 1.0) -> List[Dict[str, Any]]:
    """No weight decay on biases, norms and other 1-D parameters (standard GPT practice).

    ``layer_lr_decay`` < 1 (fine-tuning, ``task.layer_lr_decay``): one group per depth, each with
    ``lr_scale = decay ** (top - depth)`` (embeddings deepest-scaled, heads at 1.0), which
    :func:`train_micro_batches` multiplies into the step's lr. Frozen parameters are left out, so
    the optimizer holds no state for them (LoRA, ``task.freeze_layers``)."""
    n_layers = len(getattr(model, "blocks", None) or getattr(model, "layers", None) or [])
    groups: Dict[tuple, Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = layer_index(name, n_layers) if layer_lr_decay != 1.0 else 0
        decay = p.dim() >= 2
        g = groups.setdefault((depth, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                               "lr_scale": layer_lr_decay ** (n_layers + 1 - depth)
                                               if layer_lr_decay != 1.0 else 1.0})
        g["params"].append(p)
    if layer_lr_decay == 1.0:  # the historical two groups, in order (checkpoints keep loading)
        return [groups.get((0, True), {"params": [], "weight_decay": weight_decay, "lr_scale": 1.0}),
                groups.get((0, False), {"params": [], "weight_decay": 0.0, "lr_scale": 1.0})]
    return [groups[k] for k in sorted(groups)]


# Reduces (local loss sum, local "some gradient is non-finite" flag) over the ranks whose numbers
# count and returns (global mean loss, finite everywhere): one all-reduce, equal on every rank.
Agree = Callable[[torch.Tensor, torch.Tensor], Tuple[float, bool]]


def train_micro_batches(owner: Engine, ds_engine, optimizer, micro_batches: List[Any], lr: float,
                        loss_fn: Callable[[Any], Any], device: torch.device,
                        agree: Agree, before_optimizer_step: Optional[Callable[[], None]] = None,
                        metrics_into: Optional[Dict[str, torch.Tensor]] = None,
                        clock: Optional[PhaseClock] = None) -> Tuple[float, bool, bool]:
    """One optimizer step over ``micro_batches`` through a DeepSpeed engine.

    ``loss_fn`` returns a loss tensor, or ``(loss, {name: (sum, count)})`` (a task's loss); the
    pairs are added into ``metrics_into`` (float64 2-vectors, reduced by the caller). Before the
    optimizer step every rank agrees (``agree``: one all-reduce) on the global loss and on
    whether loss and gradients are finite; ``owner.step_gate`` then decides whether the update is
    applied, identically everywhere. Returns (global loss, applied, finite). A ZeRO optimizer's
    own overflow check (partitioned gradients this rank cannot see) also withholds the update and
    counts as non-finite. The loss sum stays on the device until that all-reduce. ``clock`` gets
    ``fwd_bwd_s`` (forward, backward and the gradient reduction DeepSpeed runs inside ``backward``),
    ``comm_s`` (the agreement all-reduce) and ``optim_s`` (the step; under ZeRO-1/2/3 it includes
    the parameter all-gather).
    """
    clock = clock or PhaseClock()
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    total = torch.zeros((), dtype=torch.float64, device=device)
    n = len(micro_batches)
    for i, mb in enumerate(micro_batches):
        last = i == n - 1
        loss = loss_fn(mb)
        if isinstance(loss, tuple):
            loss, metrics = loss
            if metrics_into is not None:
                accumulate(metrics_into, metrics, device)
        loss = owner.hook_before_backward(loss, last)
        owner.hook_phase("backward")
        ds_engine.backward(loss)
        owner.hook_after_backward(last)
        total += loss.detach().double()
        if not last:
            ds_engine.step()  # not the accumulation boundary: DeepSpeed only counts the micro-batch
    clock.mark("fwd_bwd_s")
    owner.hook_phase("all_reduce:loss+nonfinite")
    loss_mean, finite = agree(total, _local_grads_nonfinite(ds_engine.module, device))
    clock.mark("comm_s")
    apply = owner.step_gate.allow(loss_mean, finite)
    owner.hook_phase("optimizer_step")
    if apply and before_optimizer_step is not None:
        before_optimizer_step()
    if apply:
        ds_engine.step()
    else:
        with _update_withheld(optimizer):
            ds_engine.step()  # the boundary bookkeeping (counters, zeroed grads), no update
    clock.mark("optim_s")
    overflow = bool(getattr(optimizer, "overflow", False))
    return loss_mean, apply and not overflow, finite and not overflow


def _local_grads_nonfinite(module: nn.Module, device: torch.device) -> torch.Tensor:
    """1.0 if a gradient this rank holds is inf/nan (ZeRO-2/3 free them after reducing: their
    optimizer checks its partitions itself)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    # One foreach max-|g| per tensor (inf/nan anywhere makes it non-finite) instead of an
    # isfinite pass plus a running maximum per parameter on every step.
    worst = torch.stack(torch._foreach_norm(grads, float("inf"))).float()
    return (~torch.isfinite(worst).all()).double().to(device)


@contextmanager
def _update_withheld(optimizer) -> Iterator[None]:
    """Make the next ``ds_engine.step()`` apply no update. A ZeRO optimizer takes its own
    overflow path (it drops the gradient partitions and buffers, and the engine counts a skipped
    step); a plain torch optimizer's step becomes a no-op (the engine zeroes the gradients after)."""
    zero = hasattr(optimizer, "has_overflow") and getattr(optimizer, "check_grad_overflow", False)
    name = "has_overflow" if zero else "step"
    setattr(optimizer, name, (lambda *a, **k: True) if zero else (lambda *a, **k: None))
    try:
        yield
    finally:
        delattr(optimizer, name)  # the class's method again


def global_grad_norm(ds_engine, fallback: Optional[float] = None) -> float:
    """The norm of the last step's gradients before clipping: DeepSpeed's, else ``fallback``
    (the engine's own count, see :func:`replicated_grad_norm`), else nan."""
    gn = ds_engine.get_global_grad_norm()
    if gn is not None:
        return float(gn)
    return float(fallback) if fallback is not None else math.nan


@torch.no_grad()
def replicated_grad_norm(params) -> float:
    """2-norm of ``p.grad`` over ``params`` when every rank holds the full, already averaged
    gradients (ZeRO stage 0 after the boundary all-reduce): a local sum is the global norm.
    DeepSpeed does not record a norm at stage 0, so the engine computes it here."""
    sq = None
    for p in params:
        if p.grad is not None:
            s = p.grad.detach().double().pow(2).sum()
            sq = s if sq is None else sq + s
    return math.sqrt(float(sq)) if sq is not None else math.nan


def skip_single_rank_allreduce(ds_engine, cfg: JobConfig, dp: int) -> None:
    """With one data-parallel rank, ZeRO-0 in fp32 gains nothing from DeepSpeed's gradient
    all-reduce: it flattens every gradient into a fresh buffer, all-reduces it over one rank and
    copies it back (exact, so skipping it changes no number) - about a tenth of a small model's
    step on CPU. ZeRO-1/2/3 and bf16/fp16 keep DeepSpeed's path (their optimizers own the
    reduction and the partitioned buffers)."""
    if dp == 1 and cfg.parallel.zero_stage == 0 and cfg.parallel.precision == "fp32":
        ds_engine.enable_backward_allreduce = False
