"""The Megatron engine for ``pp = 1``: the Megatron TP model wrapped by DeepSpeed ZeRO.

The Megatron TP model (column/row-parallel layers, vocab-parallel embedding and loss, sequence
parallelism) is wrapped by DeepSpeed, which shards optimizer state (ZeRO-0/1/2) over the
data-parallel group through DeepSpeed's ``mpu`` interface (the layout's groups) and counts each
TP slice once in the gradient norm. Sequence-parallel norm gradients, partial on each TP rank,
are all-reduced over TP by a gradient hook (Megatron does it in ``finalize_model_grads``, which
DeepSpeed does not call). The micro-batch loop is the one the plain DeepSpeed engine runs
(:func:`~dist_llm.parallel.deepspeed_common.train_micro_batches`).
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

from dist_llm.config.schema import JobConfig
from dist_llm.parallel.deepspeed_common import (deepspeed_config, global_grad_norm, param_groups,
                                                skip_single_rank_allreduce, train_micro_batches)
from dist_llm.parallel.engine import StepStats
from dist_llm.parallel.layout import ParallelLayout
from dist_llm.parallel.megatron import zero_state
from dist_llm.parallel.megatron.base import MegatronEngineBase
from dist_llm.parallel.megatron.checkpoint import Moments


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
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=module, model_parameters=param_groups(module, cfg.optim.weight_decay),
            config=deepspeed_config(cfg, layout.dp), mpu=layout.mpu(), dist_init_required=False)
        skip_single_rank_allreduce(self.ds, cfg, layout.dp if layout.tp == 1 else 0)  # tp > 1: keep DeepSpeed's path
        self.zero_stage = cfg.parallel.zero_stage

    def _allreduce_sp_grads_over_tp(self, module: torch.nn.Module) -> None:
        layout, group = self.layout, self.layout.tp_group

        def allreduce_tp(grad: torch.Tensor) -> torch.Tensor:
            return layout.all_reduce(grad.clone(), group=group)

        for p in module.parameters():
            if getattr(p, "sequence_parallel", False):
                p.register_hook(allreduce_tp)

    # --- compute ---
    def _mean_loss(self, module: torch.nn.Module, mb: torch.Tensor) -> torch.Tensor:
        return self.per_token_loss(module, mb).float().mean()

    def train_step(self, micro_batches: List[torch.Tensor], lr: float) -> StepStats:
        self.check_micro_batches(micro_batches)
        clock = self.phase_clock()
        loss, applied, finite = train_micro_batches(self, self.ds, self.optimizer, micro_batches, lr,
                                                    lambda mb: self._mean_loss(self.ds, mb), self.layout.device,
                                                    lambda s, bad: self._agree(s, bad, len(micro_batches)),
                                                    clock=clock)
        return StepStats(loss=loss, grad_norm=global_grad_norm(self.ds), applied=applied, finite=finite,
                         timings=clock.times)

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
            for mb in micro_batches:
                total[0] += self._mean_loss(module, mb).double()
            total[1] = len(micro_batches)
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
