"""AdamW with ZeRO-1 over the data-parallel group, for pipeline-parallel Megatron models.

Why not Megatron-core's ``DistributedOptimizer``: in 0.16.1 without Transformer Engine or Apex
its state did not resume from ``dist_checkpointing`` (flattened ranges rejected by the default
format; ``fully_reshardable`` saves but asserts on load). Why not DeepSpeed: its engine owns
backward and gradient accumulation, which the pipeline schedules own here. So this is the
smallest optimizer that shards over DP and checkpoints per parameter:

* every parameter has one owner among the DP ranks (balanced by size, decided identically on
  every rank); the owner alone keeps its AdamW moments and updates it, then broadcasts the new
  values to the other DP replicas;
* gradients arrive already averaged over DP in ``param.main_grad`` (Megatron DDP +
  ``finalize_model_grads``); the global norm counts each tensor-parallel slice once (replicated
  parameters on TP rank 0 only, the last stage's copy of a tied embedding not at all) and is
  summed over the model-parallel (TP x PP) group, as Megatron's clip does;
* the state is per parameter (``exp_avg``/``exp_avg_sq`` shaped like the parameter, one global
  step count), so checkpoints shard it exactly like the weights and any layout can load it.

With ``shard=False`` (``zero_stage=0``) every DP rank owns everything: plain replicated AdamW.

Mixed precision (bf16 parameters): AdamW runs on fp32 master copies of the parameters
(``self.masters``); Megatron DDP reduces the gradients in fp32 (``grad_reduce_in_fp32``). The
owner updates its masters, broadcasts the new fp32 values to the other DP replicas, and every
rank copies master -> bf16 parameter. Every DP rank keeps the fp32 masters of all its local
parameters (4 bytes per parameter, not sharded over DP; the moments are): the full-weight export
and the checkpoint read them on any rank without another collective.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import torch
import torch.distributed as dist


def _counts_in_norm(p: torch.nn.Parameter, tp_rank: int) -> bool:
    if getattr(p, "shared", False):  # last stage's copy of the tied embedding: counted on stage 0
        return False
    return bool(getattr(p, "tensor_model_parallel", False)) or tp_rank == 0


class DPShardedAdamW:
    def __init__(self, named_params: List[Tuple[str, torch.nn.Parameter]], optim_cfg, layout, shard: bool):
        self.layout = layout
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.max_norm = optim_cfg.grad_clip
        dp = layout.dp if shard else 1
        # Greedy balance by size, biggest first; ties broken by name so every rank agrees.
        order = sorted(range(len(self.params)), key=lambda i: (-self.params[i].numel(), self.names[i]))
        load = [0] * dp
        self.owner = [0] * len(self.params)
        for i in order:
            k = min(range(dp), key=lambda r: (load[r], r))
            self.owner[i] = k
            load[k] += self.params[i].numel()
        self.shard_dp = dp
        me = layout.dp_rank if shard else 0
        self.owned = [i for i in range(len(self.params)) if self.owner[i] == me]
        # fp32 parameters are their own masters; lower-precision ones get an fp32 copy
        self.mixed = any(p.dtype != torch.float32 for p in self.params)
        self.masters = [p.detach().float().clone() if self.mixed else p for p in self.params]
        decay = [self.masters[i] for i in self.owned if self.params[i].dim() >= 2]
        no_decay = [self.masters[i] for i in self.owned if self.params[i].dim() < 2]
        groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.inner = torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
                                       eps=optim_cfg.eps)
        self.step_count = 0

    def owns(self, name: str) -> bool:
        return self.owner[self.names.index(name)] == (self.layout.dp_rank if self.shard_dp > 1 else 0)

    @torch.no_grad()
    def grad_norm(self) -> float:
        sq = torch.zeros((), dtype=torch.float64, device=self.layout.device)
        for p in self.params:
            if _counts_in_norm(p, self.layout.tp_rank):
                sq += p.main_grad.double().pow(2).sum()
        if self.layout.mp_group is not None and self.layout.tp * self.layout.pp > 1:
            self.layout.all_reduce(sq, group=self.layout.mp_group)
        return math.sqrt(float(sq))

    @torch.no_grad()
    def step(self, lr: float, allow: Callable[[float], bool] = math.isfinite) -> Tuple[float, bool]:
        """Clip and step; returns (grad norm, applied). ``allow(norm)`` (equal on every rank: the
        norm is global) may withhold the update: then weights, moments and step count stay."""
        norm = self.grad_norm()
        if not allow(norm):
            return norm, False
        coef = self.max_norm / (norm + 1e-6) if self.max_norm > 0 else 1.0
        for i in self.owned:
            m = self.masters[i]
            m.grad = self.params[i].main_grad.to(m.dtype) * min(coef, 1.0)
        for g in self.inner.param_groups:
            g["lr"] = lr
        self.inner.step()
        for i in self.owned:
            self.masters[i].grad = None
        self.step_count += 1
        self._broadcast_from_owners()
        if self.mixed:
            for p, m in zip(self.params, self.masters):
                p.data.copy_(m)
        return norm, True

    @torch.no_grad()
    def refresh_masters(self) -> None:
        """The parameters were overwritten (full-weight load): take them as the new masters."""
        if self.mixed:
            for p, m in zip(self.params, self.masters):
                m.copy_(p.detach().float())

    @torch.no_grad()
    def load_masters(self, masters: Dict[str, torch.Tensor]) -> None:
        """Install fp32 masters (by parameter name, e.g. from a checkpoint) and copy them into the
        low-precision parameters."""
        for name, p, m in zip(self.names, self.params, self.masters):
            m.copy_(masters[name])
            if self.mixed:
                p.data.copy_(m)

    def master_of(self) -> Dict[str, torch.Tensor]:
        """``{name: fp32 master}`` for every local parameter (the parameter itself in fp32)."""
        return dict(zip(self.names, self.masters))

    def _broadcast_from_owners(self) -> None:
        if self.shard_dp == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for k in range(self.shard_dp):  # one broadcast per owner: its parameters flattened
            mine = [self.masters[i] for i in range(len(self.params)) if self.owner[i] == k]
            if not mine:
                continue
            flat = _flatten_dense_tensors([p.data for p in mine])
            self.layout.broadcast(flat, src=dist.get_global_rank(self.layout.dp_group, k), group=self.layout.dp_group)
            for p, v in zip(mine, _unflatten_dense_tensors(flat, [p.data for p in mine])):
                p.data.copy_(v)

    # --- state: per parameter, only for owned parameters ---
    def moments(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """``{name: {"exp_avg": t, "exp_avg_sq": t}}`` for the parameters this rank owns
        (zeros before the first step, which is what AdamW starts from)."""
        out = {}
        for i in self.owned:
            p = self.masters[i]
            st = self.inner.state.get(p, {})
            out[self.names[i]] = {k: st.get(k, torch.zeros_like(p)) for k in ("exp_avg", "exp_avg_sq")}
        return out

    def set_moments(self, moments: Dict[str, Dict[str, torch.Tensor]], step: int) -> None:
        for i in self.owned:
            p = self.masters[i]
            m = moments[self.names[i]]
            self.inner.state[p] = {"step": torch.tensor(float(step)), "exp_avg": m["exp_avg"].clone(),
                                   "exp_avg_sq": m["exp_avg_sq"].clone()}
        self.step_count = step
