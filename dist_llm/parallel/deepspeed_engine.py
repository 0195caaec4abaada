"""DeepSpeed ZeRO (stages 0-3) as an :class:`~dist_llm.parallel.engine.Engine`.

Our config maps onto a DeepSpeed config dict; ``deepspeed.initialize`` wraps the plain model.
DeepSpeed's own checkpoint files are not used: its loader unpickles with ``weights_only=False``.
Instead the engine exposes full weights (gathered under ZeRO-3) and each rank's optimizer
partition as plain tensors, which the checkpoint module stores as safetensors / a
``weights_only`` torch file.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

import torch
from torch import nn

from dist_llm.config.schema import JobConfig
from dist_llm.parallel.deepspeed_common import (deepspeed_config, global_grad_norm, param_groups,
                                                skip_single_rank_allreduce, train_micro_batches)
from dist_llm.parallel.engine import Engine, StepStats
from dist_llm.parallel.layout import ParallelLayout

_LIVE = "__live__"  # placeholder for a non-plain object; restored from the live optimizer on load


def _plain(obj: Any) -> Any:
    """Keep tensors and plain values; replace other objects (DeepSpeed's loss scaler, enums,
    fragment addresses) by a placeholder so the file loads with ``weights_only=True``."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if obj is None or type(obj) in (bool, int, float, str):  # exact types: IntEnum subclasses are objects
        return obj
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return _LIVE


def _overlay(saved: Any, live: Any) -> Any:
    if isinstance(saved, str) and saved == _LIVE:
        return live
    if isinstance(saved, dict) and isinstance(live, dict):
        return {k: _overlay(v, live.get(k)) for k, v in saved.items()}
    if isinstance(saved, (list, tuple)) and isinstance(live, (list, tuple)) and len(saved) == len(live):
        return type(saved)(_overlay(s, v) for s, v in zip(saved, live))
    return saved


def _skip_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-loading its shared-memory comm op on CPU.

    The op only speeds up inference all-reduce, but loading it takes a file lock under
    ~/.cache/torch_extensions in every process; a rank killed inside that window leaves the lock
    behind and every later DeepSpeed job on the machine waits on it forever. Training does not
    use the op, so it is marked unavailable (DeepSpeed then falls back to torch.distributed).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedEngine(Engine):
    """Full weights and per-rank optimizer partitions; no sharded checkpoint (``supports_sharded``
    is False), so a checkpoint resumes only at the same world size."""

    def __init__(self, cfg: JobConfig, model: nn.Module, layout: ParallelLayout):
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if layout.device.type == "cpu" else "cuda")
        import deepspeed  # imported late: it reads DS_ACCELERATOR at import time

        self._ds = deepspeed
        if layout.device.type == "cpu":
            _skip_shm_comm_op()
        self.cfg = cfg
        self.layout = layout
        self.stage = cfg.parallel.zero_stage
        self.model = model
        self.ds_config = deepspeed_config(cfg, layout.dp)
        self.grad_accum = self.ds_config["gradient_accumulation_steps"]
        if cfg.parallel.precision == "bf16":
            model = model.to(torch.bfloat16)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=self.ds_config,
            dist_init_required=False)
        skip_single_rank_allreduce(self.engine, cfg, layout.dp)
        self.device = layout.device

    # --- compute ---
    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        return self.engine(batch[:, :-1], batch[:, 1:])

    def train_step(self, micro_batches: List[torch.Tensor], lr: float) -> StepStats:
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"got {len(micro_batches)} micro-batches, DeepSpeed expects {self.grad_accum}")
        # Accumulated on the device: no host sync per micro-batch, one all-reduce per step.
        clock = self.phase_clock()
        total = train_micro_batches(self.engine, self.optimizer, micro_batches, lr, self._loss, self.device, clock)
        self.layout.all_reduce_sum(total)
        gn = global_grad_norm(self.engine)
        loss = float(total) / (len(micro_batches) * self.layout.dp)  # the step's one host sync
        clock.mark("comm_s")  # the loss all-reduce (gradient reductions are inside fwd_bwd/optim)
        return StepStats(loss=loss, grad_norm=gn, timings=clock.times)

    @torch.no_grad()
    def eval_loss(self, micro_batches: List[torch.Tensor]) -> float:
        self.engine.eval()
        try:
            total = torch.zeros(2, dtype=torch.float64, device=self.device)
            for mb in micro_batches:
                total[0] += self._loss(mb).double() * mb.shape[0]
                total[1] += mb.shape[0]
            self.layout.all_reduce_sum(total)
        finally:
            self.engine.train()
        return float(total[0] / total[1])

    # --- state ---
    def _all_params(self) -> list:
        return list(self.engine.module.parameters())

    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        module = self.engine.module
        if self.stage == 3:
            with self._ds.zero.GatheredParameters(self._all_params(), modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}

    def load_model_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        module = self.engine.module
        if self.stage == 3:
            with self._ds.zero.GatheredParameters(self._all_params(), modifier_rank=0):
                if self.layout.rank == 0:
                    module.load_state_dict(state, strict=True)
        else:
            module.load_state_dict(state, strict=True)
        # ZeRO-1/2 keep fp32 master partitions; refresh them from the new weights. (On resume the
        # optimizer state loaded next restores them bit-exactly anyway.)
        if self.stage in (1, 2) and hasattr(self.optimizer, "_restore_from_bit16_weights"):
            self.optimizer._restore_from_bit16_weights()

    def optimizer_state(self) -> Dict[str, Any]:
        return _plain(self.optimizer.state_dict())

    def load_optimizer_state(self, state: Dict[str, Any]) -> None:
        live = self.optimizer.state_dict()
        merged = _overlay(state, live)
        if self.stage == 0:
            self.optimizer.load_state_dict(merged)
            return
        per_rank: List[Any] = [None] * self.layout.dp
        per_rank[self.layout.dp_rank] = merged
        self.optimizer.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)
