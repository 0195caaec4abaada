"""The Megatron engine for ``pp = 1``: the Megatron TP model wrapped by DeepSpeed ZeRO.

The Megatron TP model (column/row-parallel layers, vocab-parallel embedding and loss, sequence
parallelism) is wrapped by DeepSpeed, which shards optimizer state (ZeRO-0/1/2) over the
data-parallel group through DeepSpeed's ``mpu`` interface (the layout's groups) and counts each
TP slice once in the gradient norm. Sequence-parallel norm gradients, partial on each TP rank,
are all-reduced over TP by a gradient hook (Megatron does it in ``finalize_model_grads``, which
DeepSpeed does not call). The micro-batch loop is the one the plain DeepSpeed engine runs
(:func:`~dist_llm.parallel.deepspeed_common.train_micro_batches`); the loss of a micro-batch
is the arch strategy's (GPT: causal LM on token ids; BERT: MLM + NSP with the task's metrics).
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

from dist_llm.config.schema import JobConfig
from dist_llm.parallel.deepspeed_common import (DeepSpeedCalls, deepspeed_config, global_grad_norm, param_groups,
                                                skip_single_rank_allreduce, train_micro_batches)
from dist_llm.parallel.engine import StepStats, accumulate, reduce_metrics
from dist_llm.parallel.layout import ParallelLayout
from dist_llm.parallel.megatron import zero_state
from dist_llm.parallel.megatron.base import MegatronEngineBase
from dist_llm.parallel.megatron.checkpoint import MOMENTS, Moments


class MegatronDeepSpeedEngine(MegatronEngineBase):
    def __init__(self, cfg: JobConfig, model: torch.nn.Module, layout: ParallelLayout):
        if cfg.parallel.pp != 1:
            raise ValueError(f"MegatronDeepSpeedEngine needs parallel.pp=1, got {cfg.parallel.pp}: "
                             f"use MegatronPipelineEngine (build_engine picks it)")
        super().__init__(cfg, model, layout)
        import deepspeed

        module = self.chunks[0]
        if cfg.parallel.sp and layout.tp > 1:
            self._allreduce_sp_grads_over_tp(module)
        # DeepSpeed clips here (its norm is TP-aware); only the plain DeepSpeed engine owns clipping
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=module, model_parameters=param_groups(module, cfg.optim.weight_decay),
            config=deepspeed_config(cfg, layout.dp), mpu=layout.mpu(), dist_init_required=False)
        skip_single_rank_allreduce(self.ds, cfg, layout.dp if layout.tp == 1 else 0)  # tp > 1: keep DeepSpeed's path
        self.zero_stage = cfg.parallel.zero_stage
        self._params = tuple(self.ds.module.parameters())  # listed once: the step filters it
        self._calls = DeepSpeedCalls(self.ds, self.optimizer)  # DeepSpeed clips (TP-aware norm): its path

    def _allreduce_sp_grads_over_tp(self, module: torch.nn.Module) -> None:
        layout, group = self.layout, self.layout.tp_group

        def allreduce_tp(grad: torch.Tensor) -> torch.Tensor:
            return layout.all_reduce(grad.clone(), group=group)

        for p in module.parameters():
            if getattr(p, "sequence_parallel", False):
                p.register_hook(allreduce_tp)

    # --- compute ---
    def _mean_loss(self, module: torch.nn.Module, mb):
        """The micro-batch's mean loss, or ``(loss, task metrics)`` (BERT)."""
        return self.arch.micro_batch_loss(self, module, mb)

    def train_step(self, micro_batches: List[torch.Tensor], lr: float) -> StepStats:
        self.check_micro_batches(micro_batches)
        clock = self.phase_clock()
        sums: Dict[str, torch.Tensor] = {}
        res = train_micro_batches(self, self._calls, self._params, micro_batches, lr,
                                  lambda mb: self._mean_loss(self.ds, mb), self.layout.device,
                                  lambda s, bad: self._agree(s, bad, len(micro_batches)), metrics_into=sums,
                                  clock=clock)
        return StepStats(loss=res.loss, grad_norm=global_grad_norm(self.ds, res.grad_norm), applied=res.applied,
                         finite=res.finite, metrics=self._reduce_metrics(sums), timings=clock.times)

    def _reduce_metrics(self, sums: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """The task's (sum, count) pairs over the global batch: the loss-reporting ranks' (one per
        DP replica; the other TP ranks hold the same numbers) summed in one world all-reduce.
        No metrics (GPT): no collective."""
        if not sums:
            return {}
        names = sorted(sums)
        stacked = torch.stack([sums[k] for k in names])
        if not self.reports_loss():
            stacked.zero_()
        self.layout.all_reduce_world_sum(stacked)
        return reduce_metrics(dict(zip(names, stacked)))

    def _agree(self, loss_sum: torch.Tensor, nonfinite: torch.Tensor, n: int) -> Tuple[float, bool]:
        """The global mean (only the loss-reporting ranks count) and the non-finite flag of every
        rank, in the one world all-reduce of :meth:`global_mean`."""
        total = torch.zeros(3, dtype=torch.float64, device=self.layout.device)
        if self.reports_loss():
            total[0], total[1] = loss_sum, n
        total[2] = nonfinite
        self.layout.all_reduce_world_sum(total)
        loss = float(total[0] / total[1])
        return loss, math.isfinite(loss) and float(total[2]) == 0.0

    @torch.no_grad()
    def eval_loss(self, micro_batches: List[torch.Tensor]) -> float:
        module = self.chunks[0]
        module.eval()
        try:
            total = self.loss_total()
            sums: Dict[str, torch.Tensor] = {}
            for mb in micro_batches:
                out = self._mean_loss(module, mb)
                if isinstance(out, tuple):
                    out, metrics = out
                    accumulate(sums, metrics, self.layout.device)
                total[0] += out.double()
            total[1] = len(micro_batches)
            self.last_eval_metrics = self._reduce_metrics(sums)
        finally:
            module.train()
        return self.global_mean(total)

    # --- state ---
    def weights_changed(self) -> None:
        if self.zero_stage in (1, 2):
            self.optimizer._restore_from_bit16_weights()  # refresh ZeRO's fp32 master partitions

    def gather_moments(self) -> Moments:
        return zero_state.gather_moments(self.optimizer, self.local_params())

    def moment_buffers(self) -> Moments:
        return zero_state.moment_buffers(self.local_params())

    def set_moments(self, got: Dict[str, Dict[str, torch.Tensor]], step: int) -> None:
        zero_state.set_moments(self.optimizer, self.local_params(), got, step)

    def optimizer_step(self) -> int:
        return zero_state.optimizer_step(self.optimizer)

    def install_plain_state(self, slices: Dict[str, Dict[str, torch.Tensor]], step: int) -> None:
        local = self.local_params()
        with torch.no_grad():
            for name, st in slices.items():
                local[name].copy_(st["master"].to(local[name].dtype))
        # ZeRO-1/2 rebuild their fp32 partitions from the weights just set, then take the moments
        self.set_moments({n: {k: st[k] for k in MOMENTS} for n, st in slices.items()}, step)
        if self.zero_stage in (1, 2) and any(p.dtype != torch.float32 for p in local.values()):
            zero_state.set_fp32_masters(self.optimizer, local, {n: st["master"] for n, st in slices.items()})
