"""What both DeepSpeed-wrapped engines share: our config as a DeepSpeed config dict, the
weight-decay parameter groups, and the micro-batch loop of one optimizer step.

Used by :class:`~dist_llm.parallel.deepspeed_engine.DeepSpeedEngine` (plain model, ZeRO over all
ranks) and :class:`~dist_llm.parallel.megatron.zero_engine.MegatronDeepSpeedEngine` (Megatron TP
model, ZeRO over the data-parallel group).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from dist_llm.config.plan import grad_accum_steps
from dist_llm.config.schema import JobConfig
from dist_llm.parallel.engine import Engine, PhaseClock, accumulate


def owns_clipping(cfg: JobConfig, tp: int = 1) -> bool:
    """Whether our step computes the gradient norm and clips, instead of DeepSpeed.

    ZeRO-0 in fp32 at tp = 1: after ``backward`` every rank holds the full, averaged gradients, so
    one foreach norm over them (what ``torch.nn.utils.clip_grad_norm_`` computes) is the global
    norm, the non-finite check (an inf/nan anywhere makes it inf/nan) and the clip coefficient at
    once. DeepSpeed's stage-0 clipping would loop over the tensors and all-reduce the norm over
    the data-parallel group once more. ZeRO-1/2/3, bf16/fp16 (their optimizers own partitioned
    or low-precision buffers) and tp > 1 (a norm over TP shards) keep DeepSpeed's."""
    par = cfg.parallel
    return par.zero_stage == 0 and par.precision == "fp32" and tp == 1


def deepspeed_config(cfg: JobConfig, dp: int, own_clipping: bool = False) -> Dict[str, Any]:
    """Our config as DeepSpeed's dict. ``own_clipping`` (:func:`owns_clipping`): DeepSpeed does
    not clip, the step does."""
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
        "gradient_clipping": 0.0 if own_clipping else opt.grad_clip,
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
# Issues the loss all-reduce for a local loss sum without waiting; the returned function waits
# and gives the global mean loss, equal on every rank.
AgreeEarly = Callable[[torch.Tensor], Callable[[], float]]


class MicroStepResult(NamedTuple):
    loss: float  # global mean loss (from the agreement)
    applied: bool  # the update was applied
    finite: bool  # loss and gradients finite on every rank
    grad_norm: float  # the step's own norm before clipping when it owns clipping, else nan


def train_micro_batches(owner: Engine, calls: "DeepSpeedCalls", params: Sequence[nn.Parameter],
                        micro_batches: List[Any], lr: float,
                        loss_fn: Callable[[Any], Any], device: torch.device, agree: Agree,
                        max_norm: Optional[float] = None, agree_early: Optional[AgreeEarly] = None,
                        metrics_into: Optional[Dict[str, torch.Tensor]] = None,
                        clock: Optional[PhaseClock] = None) -> MicroStepResult:
    """One optimizer step over ``micro_batches`` through a DeepSpeed engine (``calls``: its
    backward and update, or the direct calls where DeepSpeed's wrappers do nothing,
    :func:`step_calls`). ``params`` are the module's parameters, listed once by the engine (not
    walked through the module tree per step).

    ``loss_fn`` returns a loss tensor, or ``(loss, {name: (sum, count)})`` (a task's loss); the
    pairs are added into ``metrics_into`` (float64 2-vectors; the caller's ``agree`` may reduce
    them in its all-reduce). Before the optimizer step every rank agrees (``agree``: one
    all-reduce) on the global loss and on whether loss and gradients are finite;
    ``owner.step_gate`` then decides whether the update is applied, identically everywhere. A
    ZeRO optimizer's own overflow check (partitioned gradients this rank cannot see) also
    withholds the update and counts as non-finite. The loss sum stays on the device until that
    all-reduce.

    ``max_norm`` not None: the step owns clipping (:func:`owns_clipping`; DeepSpeed was configured
    not to clip): the gradients' total 2-norm is computed once with foreach kernels, serves as the
    non-finite flag, is returned as ``grad_norm`` and clips (when ``max_norm`` > 0) as
    ``torch.nn.utils.clip_grad_norm_`` would. ``agree_early`` (only where every rank holds the
    full, averaged gradients after ``backward``, so the norm is the same everywhere: ZeRO-0):
    the loss all-reduce is issued before the last backward and runs during it, and finiteness is
    the global loss's and the norm's, with no collective after backward. ``clock`` gets
    ``fwd_bwd_s`` (forward, backward and the gradient reduction DeepSpeed runs inside
    ``backward``), ``comm_s`` (the norm or non-finite check and the agreement) and ``optim_s``
    (the step; under ZeRO-1/2/3 it includes the parameter all-gather).
    """
    clock = clock or PhaseClock()
    for group in calls.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    total, answer = _forward_backward(owner, calls, micro_batches, loss_fn, device, agree_early, metrics_into)
    clock.mark("fwd_bwd_s")
    params = [p for p in params if p.grad is not None]  # ZeRO-2/3 free what they reduced
    norm = _total_norm([p.grad for p in params], 2.0 if max_norm is not None else math.inf, device)
    if answer is None:
        owner.hook_phase("all_reduce:loss+nonfinite")
        loss_mean, finite = agree(total, (~torch.isfinite(norm)).double())
    else:
        loss_mean = answer()
        finite = math.isfinite(loss_mean) and math.isfinite(float(norm))
    clock.mark("comm_s")
    apply = owner.step_gate.allow(loss_mean, finite)
    owner.hook_phase("optimizer_step")
    if apply:
        if max_norm:  # owned clipping (max_norm 0 or None: none here); takes parameters, not grads
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        calls.update()
    else:
        calls.withhold()
    clock.mark("optim_s")
    overflow = bool(getattr(calls.optimizer, "overflow", False))
    grad_norm = float(norm) if max_norm is not None else math.nan
    return MicroStepResult(loss_mean, apply and not overflow, finite and not overflow, grad_norm)


def _forward_backward(owner: Engine, calls: "DeepSpeedCalls", micro_batches: List[Any], loss_fn: Callable[[Any], Any],
                      device: torch.device, agree_early: Optional[AgreeEarly],
                      metrics_into: Optional[Dict[str, torch.Tensor]]) -> Tuple[torch.Tensor, Any]:
    """Forward and backward of every micro-batch through DeepSpeed. Returns the local loss sum
    (on the device) and, with ``agree_early``, the pending loss agreement it issued once the last
    micro-batch's loss was known (else None)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    answer = None
    n = len(micro_batches)
    for i, mb in enumerate(micro_batches):
        last = i == n - 1
        loss = loss_fn(mb)
        if isinstance(loss, tuple):
            loss, metrics = loss
            if metrics_into is not None:
                accumulate(metrics_into, metrics, device)
        loss = owner.hook_before_backward(loss, last)
        total += loss.detach().double()
        if last and agree_early is not None:
            owner.hook_phase("all_reduce:loss+nonfinite")
            answer = agree_early(total)
        owner.hook_phase("backward")
        calls.backward(loss)
        owner.hook_after_backward(last)
        if not last:
            calls.between_micro_batches()
    return total, answer


def _total_norm(grads: List[torch.Tensor], norm_type: float, device: torch.device) -> torch.Tensor:
    """The ``norm_type`` norm over all of ``grads`` with foreach kernels, on the device, no host
    sync. inf/nan in any gradient makes it inf/nan; the inf-norm (max |g|) cannot overflow, so as
    a non-finite check it flags exactly the tensors holding inf/nan."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.nn.utils.get_total_norm(grads, norm_type).to(device)


class DeepSpeedCalls:
    """A step's forward module, backward and update through DeepSpeed's engine (every stage and
    precision: its optimizer owns reduction, partitions and loss scaling)."""

    def __init__(self, ds_engine, optimizer):
        self.ds_engine, self.optimizer = ds_engine, optimizer

    @property
    def module(self) -> Callable[..., Any]:
        """What a training micro-batch's forward calls."""
        return self.ds_engine

    def backward(self, loss: torch.Tensor) -> None:
        self.ds_engine.backward(loss)

    def between_micro_batches(self) -> None:
        self.ds_engine.step()  # not the accumulation boundary: DeepSpeed only counts the micro-batch

    def update(self) -> None:
        self.ds_engine.step()

    def withhold(self) -> None:
        """The boundary's bookkeeping (counters, zeroed gradients) without the update."""
        with _update_withheld(self.optimizer):
            self.ds_engine.step()


class DirectCalls(DeepSpeedCalls):
    """ZeRO-0, fp32, one data-parallel rank, the step owning clipping (:func:`step_calls`): the
    module, ``(loss / accumulation).backward()``, the torch optimizer's ``step`` and
    ``zero_grad(set_to_none=True)`` - what DeepSpeed's wrappers reduce to here. They also run
    forward/backward hooks, timers, throughput and monitor bookkeeping, an all-reduce over one
    rank (already off, :func:`skip_single_rank_allreduce`) and a ``named_parameters`` walk to
    zero the gradients: ~1,200 of the ~3,600 Python calls of a demo-model step. The numbers are
    bit-identical (tests/test_perf_engine.py). DeepSpeed's step counters stay at 0; nothing reads
    them (our checkpoints keep their own)."""

    def __init__(self, ds_engine, optimizer):
        super().__init__(ds_engine, optimizer)
        self.accumulation = ds_engine.gradient_accumulation_steps()
        for name in ("module_forward_pre_hook", "module_forward_post_hook"):  # timers and profiler only
            handle = getattr(ds_engine, name, None)
            if handle is not None:
                handle.remove()
                setattr(ds_engine, name, None)

    @property
    def module(self) -> Callable[..., Any]:
        return self.ds_engine.module

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()  # DeepSpeed's scaling, same expression

    def between_micro_batches(self) -> None:
        pass

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def withhold(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def step_calls(ds_engine, optimizer, owns_clip: bool) -> DeepSpeedCalls:
    """:class:`DirectCalls` where DeepSpeed's wrappers add nothing, else :class:`DeepSpeedCalls`.
    That is where the step owns clipping (:func:`owns_clipping`: ZeRO-0, fp32) and DeepSpeed's
    gradient all-reduce is off (:func:`skip_single_rank_allreduce`: one data-parallel rank), with
    a plain torch optimizer."""
    direct = owns_clip and not ds_engine.enable_backward_allreduce and isinstance(optimizer, torch.optim.Optimizer)
    return (DirectCalls if direct else DeepSpeedCalls)(ds_engine, optimizer)


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
    (the step's own norm, see :func:`owns_clipping`), else nan."""
    gn = ds_engine.get_global_grad_norm()
    if gn is not None:
        return float(gn)
    return float(fallback) if fallback is not None else math.nan


def skip_single_rank_allreduce(ds_engine, cfg: JobConfig, dp: int) -> None:
    """With one data-parallel rank, ZeRO-0 in fp32 gains nothing from DeepSpeed's gradient
    all-reduce: it flattens every gradient into a fresh buffer, all-reduces it over one rank and
    copies it back (exact, so skipping it changes no number) - about a tenth of a small model's
    step on CPU. ZeRO-1/2/3 and bf16/fp16 keep DeepSpeed's path (their optimizers own the
    reduction and the partitioned buffers)."""
    if dp == 1 and cfg.parallel.zero_stage == 0 and cfg.parallel.precision == "fp32":
        ds_engine.enable_backward_allreduce = False
