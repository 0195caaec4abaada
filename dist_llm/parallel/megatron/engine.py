"""Megatron-core tensor/pipeline parallelism as an :class:`~dist_llm.parallel.engine.Engine`.

Two paths, chosen by the layout (docs/parallelism.md says why):

* ``pp == 1``: the Megatron TP model (column/row-parallel layers, vocab-parallel embedding and
  loss, sequence parallelism) is wrapped by DeepSpeed, which shards optimizer state (ZeRO-0/1/2)
  over the data-parallel group through DeepSpeed's ``mpu`` interface (the layout's groups) and
  counts each TP slice once in the gradient norm. Sequence-parallel norm gradients, partial on
  each TP rank, are all-reduced over TP by a gradient hook (Megatron does it in
  ``finalize_model_grads``, which DeepSpeed does not call).
* ``pp > 1``: Megatron-core's own schedules (1F1B; interleaved with ``vpp > 1``) through
  ``get_forward_backward_func``, Megatron DDP for DP gradient reduction, and
  :class:`~dist_llm.parallel.megatron.optimizer.DPShardedAdamW` (ZeRO-1 over DP).

The loss is computed on the last stage and all-reduced so every rank reports the same number.
Checkpoints: full plain weights through :meth:`model_state_dict` (export, ``best/``), and a
resharding ``dist_checkpointing`` copy of weights + optimizer through :meth:`save_sharded`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from dist_llm.config.schema import JobConfig
from dist_llm.parallel.engine import StepStats
from dist_llm.parallel.layout import ParallelLayout
from dist_llm.parallel.megatron import model as mm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class MegatronEngine:
    reshardable = True  # the checkpoint manager may load a checkpoint saved at another layout

    def __init__(self, cfg: JobConfig, model: torch.nn.Module, layout: ParallelLayout):
        self.cfg, self.layout = cfg, layout
        self.model = model  # the plain model as built (not kept in sync: use model_state_dict())
        self.ps = layout.init_megatron()
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(cfg.train.seed)  # tensor-parallel dropout/init streams
        self._rng_tracker = get_cuda_rng_tracker
        par, tr = cfg.parallel, cfg.train
        self.mcfg = model.cfg  # resolved preset defaults
        self.gated = self.mcfg.preset == "llama"
        self.tcfg = mm.transformer_config(self.mcfg, par.tp, par.pp, par.vpp, par.sp, DTYPES[par.precision])
        self.chunks = [c.to(layout.device) for c in mm.build_chunks(self.mcfg, self.tcfg, par.vpp)]
        self._load_full(mm.plain_to_megatron(model.state_dict(), self.mcfg))
        self.grad_accum = tr.global_batch_size // (tr.micro_batch_size * layout.dp)
        T = tr.seq_len
        self._pos = torch.arange(T, device=layout.device).unsqueeze(0).expand(tr.micro_batch_size, -1)
        self._mask = torch.triu(torch.ones(1, 1, T, T, dtype=torch.bool, device=layout.device), diagonal=1)
        self.ds = None
        if par.pp == 1:
            self._init_deepspeed()
        else:
            self._init_pipeline()

    # --- construction ---
    def _init_deepspeed(self) -> None:
        import deepspeed

        from dist_llm.parallel.deepspeed_engine import deepspeed_config, param_groups

        module = self.chunks[0]
        if self.cfg.parallel.sp and self.layout.tp > 1:
            group = self.layout.tp_group

            def allreduce_tp(grad: torch.Tensor) -> torch.Tensor:
                grad = grad.clone()
                dist.all_reduce(grad, group=group)
                return grad

            for p in module.parameters():
                if getattr(p, "sequence_parallel", False):
                    p.register_hook(allreduce_tp)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=module, model_parameters=param_groups(module, self.cfg.optim.weight_decay),
            config=deepspeed_config(self.cfg, self.layout.dp), mpu=self.layout.mpu(), dist_init_required=False)
        self.zero_stage = self.cfg.parallel.zero_stage

    def _init_pipeline(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from dist_llm.parallel.megatron.optimizer import DPShardedAdamW

        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=False)
        self.ddps = [DistributedDataParallel(config=self.tcfg, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
                     for i, c in enumerate(self.chunks)]
        self.tcfg.no_sync_func = [d.no_sync for d in self.ddps] if len(self.ddps) > 1 else self.ddps[0].no_sync
        self.tcfg.finalize_model_grads_func = finalize_model_grads
        self.fb = get_forward_backward_func()
        named = [(n, p) for c in self.chunks for n, p in mm.local_params(c).items() if p.requires_grad]
        self.optimizer = DPShardedAdamW(named, self.cfg.optim, self.layout, shard=self.cfg.parallel.zero_stage >= 1)

    # --- compute ---
    def _split(self, mb: torch.Tensor):
        mb = mb.to(self.layout.device, non_blocking=True)
        return mb[:, :-1].contiguous(), mb[:, 1:].contiguous()

    def _global_mean(self, total: float, count: int) -> float:
        """Mean of per-micro-batch losses over the global batch: only the last stage's TP rank 0
        contributes, then a world all-reduce gives every rank the same number."""
        t = torch.zeros(2, dtype=torch.float64)
        if self.layout.pp_rank == self.layout.pp - 1 and self.layout.tp_rank == 0:
            t[0], t[1] = total, count
        self.layout.all_reduce_world_sum(t)
        return float(t[0] / t[1])

    def _pipeline(self, micro_batches: List[torch.Tensor], forward_only: bool) -> List[float]:
        def forward_step(data_iterator, model):
            ids, labels = self._split(next(data_iterator))
            out = model(ids, self._pos[: ids.shape[0]], self._mask, labels=labels)  # [b, s] on the last stage

            def loss_func(output):
                loss = output.float().mean()
                return loss, {"loss": loss.detach().clone()}  # the schedule divides loss in place
            return out, loss_func

        iters = [iter(micro_batches) for _ in self.ddps]
        out = self.fb(forward_step_func=forward_step, data_iterator=iters if len(iters) > 1 else iters[0],
                      model=self.ddps, num_microbatches=len(micro_batches), seq_length=self.cfg.train.seq_len,
                      micro_batch_size=micro_batches[0].shape[0], forward_only=forward_only)
        return [float(d["loss"]) for d in out] if self.layout.pp_rank == self.layout.pp - 1 else []

    def train_step(self, micro_batches: List[torch.Tensor], lr: float) -> StepStats:
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"got {len(micro_batches)} micro-batches, expected {self.grad_accum}")
        if self.ds is None:
            for d in self.ddps:
                d.zero_grad_buffer()
            losses = self._pipeline(micro_batches, forward_only=False)
            gn = self.optimizer.step(lr)
            return StepStats(loss=self._global_mean(sum(losses), len(losses)), grad_norm=gn)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for mb in micro_batches:
            ids, labels = self._split(mb)
            loss = self.ds(ids, self._pos[: ids.shape[0]], self._mask, labels=labels).float().mean()
            self.ds.backward(loss)
            self.ds.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            total += float(loss.detach())
        gn = self.ds.get_global_grad_norm()
        gn = float(gn) if gn is not None else math.nan
        return StepStats(loss=self._global_mean(total, len(micro_batches)), grad_norm=gn)

    @torch.no_grad()
    def eval_loss(self, micro_batches: List[torch.Tensor]) -> float:
        for c in self.chunks:
            c.eval()
        try:
            if self.ds is None:
                losses = self._pipeline(micro_batches, forward_only=True)
            else:
                losses = []
                for mb in micro_batches:
                    ids, labels = self._split(mb)
                    losses.append(float(self.chunks[0](ids, self._pos[: ids.shape[0]], self._mask,
                                                       labels=labels).float().mean()))
        finally:
            for c in self.chunks:
                c.train()
        return self._global_mean(sum(losses), len(losses))

    # --- full weights in plain names ---
    def _local(self) -> Dict[str, torch.nn.Parameter]:
        out = {}
        for c in self.chunks:
            out.update(mm.local_params(c))
        return out

    @torch.no_grad()
    def _load_full(self, full: Dict[str, torch.Tensor]) -> None:
        tp, r = self.layout.tp, self.layout.tp_rank
        for name, p in self._local().items():
            src = full.get(name)
            if src is None and name == "output_layer.weight":  # tied: the last stage's embedding copy
                src = full["embedding.word_embeddings.weight"]
            p.copy_(mm.tp_slice(name, src, mm.partition_dim(p), r, tp, self.gated).to(p.dtype))

    @torch.no_grad()
    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        """Gather TP slices (all-gather over TP) and stages (all-gather over PP): every rank
        returns the full plain state dict. Collective."""
        lay = self.layout
        merged = {}
        for name, p in sorted(self._local().items()):
            if getattr(p, "shared", False):
                continue  # tied copy on the last stage
            t = p.detach().float()
            pd = mm.partition_dim(p)
            if pd is not None and lay.tp > 1:
                parts = [torch.empty_like(t) for _ in range(lay.tp)]
                dist.all_gather(parts, t.contiguous(), group=lay.tp_group)
                t = mm.tp_merge(name, parts, pd, self.gated)
            merged[name] = t.cpu().clone()
        if lay.pp > 1:
            stages: List[Any] = [None] * lay.pp
            dist.all_gather_object(stages, merged, group=lay.pp_group)
            merged = {k: v for s in stages for k, v in s.items()}
        return mm.megatron_to_plain(merged, self.mcfg)

    def load_model_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self._load_full(mm.plain_to_megatron(state, self.mcfg))
        if self.ds is not None and self.zero_stage in (1, 2):
            self.optimizer._restore_from_bit16_weights()  # refresh ZeRO's fp32 master partitions

    # --- per-rank state (the rest of the optimizer lives in the sharded checkpoint) ---
    def optimizer_state(self) -> Dict[str, Any]:
        """Only the TP-region RNG streams: moments and step go through :meth:`save_sharded`."""
        return {"rng_tracker": {k: v.clone() for k, v in self._rng_tracker().get_states().items()}}

    def load_optimizer_state(self, state: Dict[str, Any]) -> None:
        if state.get("rng_tracker"):
            self._rng_tracker().set_states(state["rng_tracker"])

    def save_sharded(self, directory) -> None:
        from dist_llm.parallel.megatron.checkpoint import save_sharded

        save_sharded(self, directory)

    def load_sharded(self, directory) -> None:
        from dist_llm.parallel.megatron.checkpoint import load_sharded

        load_sharded(self, directory)
