"""DeepSpeed ZeRO (stages 0-3) as an :class:`~dist_llm.parallel.engine.Engine`.

Our config maps onto a DeepSpeed config dict; ``deepspeed.initialize`` wraps the plain model.
DeepSpeed's own checkpoint files are not used: its loader unpickles with ``weights_only=False``.
Instead the engine exposes full weights (gathered under ZeRO-3), and each rank writes the slices
of the optimizer state it owns in a layout-neutral form (:mod:`dist_llm.parallel.deepspeed_elastic`,
``elastic/`` in the checkpoint), which any dp size, ZeRO stage, offload setting or elastic engine
resumes from.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from dist_llm.config.schema import JobConfig
from dist_llm.parallel import deepspeed_elastic
from dist_llm.parallel.deepspeed_common import (deepspeed_config, global_grad_norm, owns_clipping, param_groups,
                                                skip_single_rank_allreduce, step_calls, train_micro_batches)
from dist_llm.parallel.elastic_state import PlainOptimizerState
from dist_llm.parallel.engine import Engine, StepStats, batch_to, reduce_metrics
from dist_llm.parallel.layout import ParallelLayout

# placeholder for a non-plain object in checkpoints written before the elastic form (DeepSpeed's
# state_dict with its loss scaler replaced); restored from the live optimizer on load
_LIVE = "__live__"


def _plain(obj: Any) -> Any:
    """Keep tensors and plain values; replace other objects (DeepSpeed's loss scaler, enums,
    fragment addresses) by a placeholder so the file loads with ``weights_only=True`` (the rank
    file's form of checkpoints written before the elastic form)."""
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
    """Full weights, and each rank's optimizer slices in the layout-neutral ``elastic/`` form
    (``elastic`` is True): a checkpoint resumes at any dp size, ZeRO stage and offload setting."""

    elastic = True

    def __init__(self, cfg: JobConfig, model: nn.Module, layout: ParallelLayout, task: Any = None):
        """``task``: a :class:`dist_llm.train.tasks.Task` whose ``loss(model, batch)`` gives the
        loss and metrics of a micro-batch; None = causal LM on [B, T+1] token ids."""
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if layout.device.type == "cpu" else "cuda")
        import deepspeed  # imported late: it reads DS_ACCELERATOR at import time

        self._ds = deepspeed
        if layout.device.type == "cpu":
            _skip_shm_comm_op()
        self.cfg = cfg
        self.layout = layout
        self.stage = cfg.parallel.zero_stage
        self.model = model
        # ZeRO-0 fp32: the step computes the norm and clips (one foreach pass, no extra all-reduce)
        self.max_norm = cfg.optim.grad_clip if owns_clipping(cfg) else None
        self.ds_config = deepspeed_config(cfg, layout.dp, own_clipping=self.max_norm is not None)
        self.grad_accum = self.ds_config["gradient_accumulation_steps"]
        if cfg.parallel.precision == "bf16":
            model = model.to(torch.bfloat16)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim.weight_decay, cfg.task.layer_lr_decay), config=self.ds_config,
            dist_init_required=False)
        skip_single_rank_allreduce(self.engine, cfg, layout.dp)
        # ZeRO-0 fp32 at dp = 1: the module and the torch optimizer directly (DeepSpeed's wrappers
        # would only add hooks and bookkeeping); else through DeepSpeed
        self.calls = step_calls(self.engine, self.optimizer, self.max_norm is not None)
        self._params = tuple(self.engine.module.parameters())  # listed once: the step filters it
        self.device = layout.device
        self.task = task
        self.last_eval_metrics = {}

    # --- compute ---
    def _loss(self, batch: Any, model: Callable[..., Any]) -> Any:
        """The loss tensor (causal LM fast path) or the task's ``(loss, metrics)``."""
        batch = batch_to(batch, self.device)
        if self.task is None:
            return model(batch[:, :-1], batch[:, 1:])
        return self.task.loss(model, batch)

    def _reduce_metrics(self, sums: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Sum the task's (sum, count) pairs over ranks in one all-reduce (sorted names: every
        rank runs the same task, so every rank holds the same names). Evaluation's; a training
        step packs them into its loss agreement."""
        if not sums:
            return {}
        names = sorted(sums)
        stacked = torch.stack([sums[k] for k in names])
        self.layout.all_reduce_sum(stacked)
        return reduce_metrics(dict(zip(names, stacked)))

    def train_step(self, micro_batches: List[Any], lr: float) -> StepStats:
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"got {len(micro_batches)} micro-batches, DeepSpeed expects {self.grad_accum}")
        sums: Dict[str, torch.Tensor] = {}  # the task's metrics: reduced in the step's one all-reduce
        reduced: Dict[str, float] = {}
        clock = self.phase_clock()
        # ZeRO-0 (owned clipping): the gradients are global after backward, so the loss all-reduce
        # can run during the last backward; other stages agree on loss and finiteness after it
        early = (lambda s: self._agree_later(s, sums, reduced)) if self.max_norm is not None else None
        module = self.calls.module
        res = train_micro_batches(self, self.calls, self._params, micro_batches, lr, lambda mb: self._loss(mb, module),
                                  self.device, lambda s, bad: self._agree(s, bad, sums, reduced), max_norm=self.max_norm,
                                  agree_early=early, metrics_into=sums, clock=clock)
        return StepStats(loss=res.loss, grad_norm=global_grad_norm(self.engine, res.grad_norm), applied=res.applied,
                         finite=res.finite, metrics=reduced, timings=clock.times)

    def _agree(self, loss_sum: torch.Tensor, nonfinite: torch.Tensor, sums: Dict[str, torch.Tensor],
               reduced: Dict[str, float]) -> Tuple[float, bool]:
        """One all-reduce for the step: the global mean loss, whether any rank saw a non-finite
        value, and the task's (sum, count) metric pairs (sorted names: every rank runs the same
        task), written into ``reduced``; one host read of the result."""
        names = sorted(sums)
        packed = torch.cat([torch.stack([loss_sum, nonfinite]), *(sums[k].reshape(2) for k in names)])
        values = self.layout.all_reduce_sum(packed).tolist()
        reduced.update(reduce_metrics({k: values[2 + 2 * i: 4 + 2 * i] for i, k in enumerate(names)}))
        loss = values[0] / (self.grad_accum * self.layout.dp)
        return loss, math.isfinite(loss) and values[1] == 0.0

    def _agree_later(self, loss_sum: torch.Tensor, sums: Dict[str, torch.Tensor],
                     reduced: Dict[str, float]) -> Callable[[], float]:
        """The loss and the task's metric sums in one all-reduce issued now (before the last
        backward, while it runs); the returned function waits, fills ``reduced`` and gives the
        global mean loss."""
        names = sorted(sums)
        pending = self.layout.all_reduce_sum_later(torch.cat([loss_sum.reshape(1), *(sums[k].reshape(2) for k in names)]))

        def answer() -> float:
            values = pending().tolist()
            reduced.update(reduce_metrics({k: values[1 + 2 * i: 3 + 2 * i] for i, k in enumerate(names)}))
            return values[0] / (self.grad_accum * self.layout.dp)

        return answer

    def _batch_size(self, mb: Any) -> int:
        return int(mb.shape[0]) if isinstance(mb, torch.Tensor) else self.task.batch_size(mb)

    @torch.no_grad()
    def eval_loss(self, micro_batches: List[Any]) -> float:
        from dist_llm.parallel.engine import accumulate

        self.engine.eval()
        sums: Dict[str, torch.Tensor] = {}
        try:
            total = torch.zeros(2, dtype=torch.float64, device=self.device)
            for mb in micro_batches:
                # the module, not DeepSpeed's wrapper: its eval() switches only the module, and a
                # task reads model.training (distill reports the student's own CE in eval)
                out = self._loss(mb, self.engine.module)
                if isinstance(out, tuple):
                    out, metrics = out
                    accumulate(sums, metrics, self.device)
                n = self._batch_size(mb)
                total[0] += out.double() * n
                total[1] += n
            self.layout.all_reduce_sum(total)
            self.last_eval_metrics = self._reduce_metrics(sums)
        finally:
            self.engine.train()
        return float(total[0] / total[1])

    # --- state ---
    def _all_params(self) -> list:
        return list(self._params)

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
        """Nothing but a marker: the optimizer state is in ``elastic/`` (:meth:`save_elastic`)."""
        return {"elastic": deepspeed_elastic.FORMAT}

    def save_elastic(self, directory) -> None:
        deepspeed_elastic.save_rank_state(directory, self.optimizer, self.engine.module, self.layout.rank,
                                          self.layout.world_size, self.stage)

    def load_plain_optimizer_state(self, state: PlainOptimizerState) -> None:
        deepspeed_elastic.load_rank_state(self.optimizer, self.engine.module, state)

    def load_optimizer_state(self, state: Dict[str, Any]) -> None:
        """A checkpoint written before the elastic form: DeepSpeed's own state_dict of this rank."""
        live = self.optimizer.state_dict()
        merged = _overlay(state, live)
        if self.stage == 0:
            self.optimizer.load_state_dict(merged)
            return
        per_rank: List[Any] = [None] * self.layout.dp
        per_rank[self.layout.dp_rank] = merged
        self.optimizer.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)
