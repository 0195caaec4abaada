"""The Megatron engine for ``pp > 1``: Megatron-core's own pipeline schedules.

1F1B (interleaved with ``vpp > 1``) through ``get_forward_backward_func``, Megatron DDP with
``finalize_model_grads`` for the DP gradient reduction (and the SP / tied-embedding gradient
all-reduces), and :class:`~dist_llm.parallel.megatron.optimizer.DPShardedAdamW` (ZeRO-1 over
DP). The loss is computed on the last stage and summed there on the device; one all-reduce per
step gives every rank the mean.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch

from dist_llm.config.schema import JobConfig
from dist_llm.parallel.engine import StepStats
from dist_llm.parallel.layout import ParallelLayout
from dist_llm.parallel.megatron.arch_select import arch_for
from dist_llm.parallel.megatron.base import MegatronEngineBase
from dist_llm.parallel.megatron.checkpoint import MOMENTS, Moments
from dist_llm.parallel.megatron.optimizer import DPShardedAdamW


class MegatronPipelineEngine(MegatronEngineBase):
    def __init__(self, cfg: JobConfig, model: torch.nn.Module, layout: ParallelLayout):
        if cfg.parallel.pp < 2:
            raise ValueError(f"MegatronPipelineEngine needs parallel.pp >= 2, got {cfg.parallel.pp}: "
                             f"use MegatronDeepSpeedEngine (build_engine picks it)")
        if not arch_for(model).supports_pipeline:
            raise ValueError(f"{type(model).__name__} has no pipeline-parallel Megatron model: use parallel.pp=1")
        super().__init__(cfg, model, layout)
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=False)
        self.ddps = [DistributedDataParallel(config=self.tcfg, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
                     for i, c in enumerate(self.chunks)]
        self.tcfg.no_sync_func = [d.no_sync for d in self.ddps] if len(self.ddps) > 1 else self.ddps[0].no_sync
        self.tcfg.finalize_model_grads_func = finalize_model_grads
        self.fb = get_forward_backward_func()
        named = [(n, p) for c in self.chunks for n, p in self.arch.local_params(c).items() if p.requires_grad]
        self.optimizer = DPShardedAdamW(named, cfg.optim, layout, shard=cfg.parallel.zero_stage >= 1)

    # --- compute ---
    def _run_schedule(self, micro_batches: List[torch.Tensor], forward_only: bool) -> torch.Tensor:
        """Run the schedule; returns :meth:`loss_total` filled on the last stage (device sums,
        no host sync per micro-batch)."""
        def forward_step(data_iterator, model):
            out = self.per_token_loss(model, next(data_iterator))  # [b, s] on the last stage

            def loss_func(output):
                loss = output.float().mean()
                return loss, {"loss": loss.detach().clone()}  # the schedule divides loss in place
            return out, loss_func

        iters = [iter(micro_batches) for _ in self.ddps]
        out = self.fb(forward_step_func=forward_step, data_iterator=iters if len(iters) > 1 else iters[0],
                      model=self.ddps, num_microbatches=len(micro_batches), seq_length=self.cfg.train.seq_len,
                      micro_batch_size=micro_batches[0].shape[0], forward_only=forward_only)
        total = self.loss_total()
        if self.layout.pp_rank == self.layout.pp - 1:
            for d in out:
                total[0] += d["loss"].double()
            total[1] = len(out)
        return total

    def train_step(self, micro_batches: List[torch.Tensor], lr: float) -> StepStats:
        self.check_micro_batches(micro_batches)
        for d in self.ddps:
            d.zero_grad_buffer()
        total = self._run_schedule(micro_batches, forward_only=False)
        self.hook_phase("all_reduce:loss")
        loss = self.global_mean(total)  # before the update: the gate decides on the global loss
        self.hook_phase("optimizer_step")
        gn, applied = self.optimizer.step(
            lr, lambda norm: self.step_gate.allow(loss, math.isfinite(loss) and math.isfinite(norm)))
        return StepStats(loss=loss, grad_norm=gn, applied=applied, finite=math.isfinite(loss) and math.isfinite(gn))

    @torch.no_grad()
    def eval_loss(self, micro_batches: List[torch.Tensor]) -> float:
        for c in self.chunks:
            c.eval()
        try:
            total = self._run_schedule(micro_batches, forward_only=True)
        finally:
            for c in self.chunks:
                c.train()
        return self.global_mean(total)

    # --- state: DPShardedAdamW's moments are already per parameter ---
    def gather_moments(self) -> Moments:
        local = self.local_params()
        owned = self.optimizer.shard_dp > 1
        return {name: (local[name], mom, owned) for name, mom in self.optimizer.moments().items()}

    def moment_buffers(self) -> Moments:
        local = self.local_params()
        owned = self.optimizer.shard_dp > 1
        return {n: (local[n], {k: torch.zeros_like(local[n], dtype=torch.float32) for k in MOMENTS}, owned)
                for n in self.optimizer.moments()}

    def set_moments(self, got: Dict[str, Dict[str, torch.Tensor]], step: int) -> None:
        self.optimizer.set_moments(got, step)

    def optimizer_step(self) -> int:
        return self.optimizer.step_count

    def install_plain_state(self, slices: Dict[str, Dict[str, torch.Tensor]], step: int) -> None:
        # masters for every local parameter (fp32: the parameters themselves), moments for the owned
        self.optimizer.load_masters({n: st["master"] for n, st in slices.items()})
        self.optimizer.set_moments({n: {k: st[k] for k in MOMENTS} for n, st in slices.items()}, step)

    # --- fp32 masters of bf16 parameters ---
    def master_weights(self) -> Dict[str, torch.Tensor]:
        return self.optimizer.master_of()

    def masters_to_save(self):
        if not self.optimizer.mixed:
            return None
        local = self.local_params()
        return {n: (local[n], m) for n, m in self.optimizer.master_of().items()}

    def set_masters(self, masters: Dict[str, torch.Tensor]) -> None:
        self.optimizer.load_masters(masters)

    def weights_changed(self) -> None:
        self.optimizer.refresh_masters()
