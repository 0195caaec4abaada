"""The interface the trainer and the checkpoint manager talk to.

Three engines implement it (``build_engine`` in :mod:`dist_llm.parallel.build` picks one):
:class:`~dist_llm.parallel.deepspeed_engine.DeepSpeedEngine` (ZeRO data parallelism),
:class:`~dist_llm.parallel.megatron.zero_engine.MegatronDeepSpeedEngine` (Megatron TP, ``pp = 1``)
and :class:`~dist_llm.parallel.megatron.pipeline_engine.MegatronPipelineEngine` (``pp > 1``).

The trainer never sees DeepSpeed or Megatron objects: it hands over micro-batches and a learning
rate and gets numbers back, and it saves/loads state through these methods.

Sharded checkpoints are part of the interface with defaults: an engine whose checkpoints reshard
sets ``supports_sharded = True`` and implements :meth:`Engine.save_sharded` /
:meth:`Engine.load_sharded` (the checkpoint manager calls them inside the step's tmp directory
before the commit, and prefers them on load); with ``reshardable = True`` the manager also
accepts a checkpoint saved at another world size / tp / pp. The manager never calls them on an
engine with ``supports_sharded = False``.

Elastic resume (another dp size, ZeRO stage, offload, or engine): an engine with ``elastic = True``
implements :meth:`Engine.load_plain_optimizer_state`, which takes the layout-neutral optimizer
state (:mod:`dist_llm.parallel.elastic_state`) that the *saving* engine's reader produces; an
engine that writes its own layout-neutral files at save time does so in
:meth:`Engine.save_elastic` (called on every rank inside the step's tmp directory).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from dist_llm.parallel.elastic_state import PlainOptimizerState


@dataclass
class StepStats:
    loss: float  # mean over the global batch (all micro-batches, all data-parallel ranks)
    grad_norm: float  # global 2-norm before clipping (nan when the engine does not compute it)
    applied: bool = True  # False: the update was withheld on every rank (see StepGate)
    finite: bool = True  # loss and gradients were finite on every rank
    # the task's metrics (e.g. mlm_accuracy), each sum/count over the global batch
    metrics: Dict[str, float] = field(default_factory=dict)
    # Seconds per phase of this step (``fwd_bwd_s``, ``optim_s``, ``comm_s``) where the engine can
    # tell them apart; empty otherwise. The trainer logs them as ``time/*``.
    timings: Dict[str, float] = field(default_factory=dict)


class StepHooks:
    """Points inside one optimizer step. The trainer registers the callbacks that subclass this
    (the hang watchdog, debug fault injection); production engines call them and know nothing
    of what they do. Every method must be cheap: it runs on every step."""

    def phase(self, name: str) -> None:
        """The step enters ``name`` (``backward``, ``all_reduce:...``, ``optimizer_step``)."""

    def before_backward(self, loss: torch.Tensor, last: bool) -> torch.Tensor:
        """May return a different loss (``last``: the step's final micro-batch)."""
        return loss

    def after_backward(self, last: bool) -> None: ...


class StepGate:
    """Decides whether a step's update is applied, from numbers that are equal on every rank
    (the all-reduced loss and non-finite flag), so every rank decides alike. The default
    withholds only non-finite updates."""

    def allow(self, loss: float, finite: bool) -> bool:
        return finite


class PhaseClock:
    """Host wall time per phase of one step, with ``perf_counter`` only.

    On a GPU the host runs ahead of the kernels, so the split is only meaningful when ``sync`` is
    set (``train.ui.breakdown``): then :meth:`mark` synchronizes the device at each phase
    boundary (a few syncs per step, which is why it is off by default). Without ``sync`` on a
    GPU the times say where the host spent its time; on CPU they are exact either way.
    """

    def __init__(self, sync: Optional[Any] = None) -> None:
        self.sync = sync
        self.times: Dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, phase: str) -> None:
        """Charge the time since the previous mark to ``phase``."""
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + now - self._t
        self._t = now


class Engine:
    model: nn.Module  # the plain model (unwrapped), e.g. for generation
    step_hooks: List[StepHooks] = []  # set by the trainer; never mutated in place
    step_gate: StepGate = StepGate()
    supports_sharded: bool = False  # has save_sharded/load_sharded
    reshardable: bool = False  # its sharded checkpoints load at another world size / tp / pp
    # implements load_plain_optimizer_state: resumes any checkpoint whose saving engine has a reader
    # in dist_llm.parallel.elastic_state.READERS, at any layout
    elastic: bool = False
    # the task metrics of the last eval_loss call ({name: sum/count over all ranks}); {} for pretrain
    last_eval_metrics: Dict[str, float] = {}
    phase_sync: Optional[Any] = None  # set by the trainer when train.ui.breakdown is on (GPU)

    def phase_clock(self) -> PhaseClock:
        return PhaseClock(self.phase_sync)

    @property
    def checkpoint_name(self) -> str:
        """Recorded as ``engine`` in a checkpoint's manifest; a checkpoint restores optimizer
        state and sharded files only into an engine of the same name."""
        return type(self).__name__

    def hook_phase(self, name: str) -> None:
        for h in self.step_hooks:
            h.phase(name)

    def hook_before_backward(self, loss: torch.Tensor, last: bool) -> torch.Tensor:
        for h in self.step_hooks:
            loss = h.before_backward(loss, last)
        return loss

    def hook_after_backward(self, last: bool) -> None:
        for h in self.step_hooks:
            h.after_backward(last)

    def train_step(self, micro_batches: List[torch.Tensor], lr: float) -> StepStats:
        """Forward/backward every micro-batch ([B, T+1] token ids, or the task's batch dicts on
        engines that take a task), then one optimizer step, unless :attr:`step_gate` withholds it
        (then no parameter or optimizer state changes)."""
        raise NotImplementedError

    def eval_loss(self, micro_batches: List[torch.Tensor]) -> float:
        """Mean token loss over these micro-batches on all data-parallel ranks (no grad)."""
        raise NotImplementedError

    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        """Full fp32 weights in the plain model's names. Collective: every rank must call it."""
        raise NotImplementedError

    def load_model_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Load full weights (same names). Collective."""
        raise NotImplementedError

    def optimizer_state(self) -> Dict[str, Any]:
        """This rank's optimizer state: only tensors and plain Python values (safe to load
        with ``torch.load(weights_only=True)``)."""
        raise NotImplementedError

    def load_optimizer_state(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`optimizer_state` returned on the same rank of the same layout."""
        raise NotImplementedError

    def save_elastic(self, directory: Path) -> None:
        """Write this rank's share of a layout-neutral optimizer state into ``directory`` (every
        rank calls it; the default writes nothing: engines whose other files are already
        layout-neutral, e.g. ``sharded/``, need no extra copy)."""

    def load_plain_optimizer_state(self, state: "PlainOptimizerState") -> None:
        """Set this rank's optimizer partitions (fp32 masters, AdamW moments) and step counts from
        a layout-neutral state; the weights are loaded already. Collective where the engine's
        partitions need it."""
        raise NotImplementedError(f"{type(self).__name__} cannot load a layout-neutral optimizer state "
                                  f"(elastic is False): resume it with the engine and layout it was saved with")

    def save_sharded(self, directory: Path) -> None:
        """Write weights + optimizer state into ``directory`` (collective)."""
        raise NotImplementedError(f"{type(self).__name__} writes no sharded checkpoint "
                                  f"(supports_sharded is False)")

    def load_sharded(self, directory: Path) -> None:
        """Restore what :meth:`save_sharded` wrote, possibly at another layout (collective)."""
        raise NotImplementedError(f"{type(self).__name__} loads no sharded checkpoint "
                                  f"(supports_sharded is False)")


# --- helpers for engines that run a task (dist_llm/train/tasks): batches and (sum, count) metrics ---
def batch_to(batch: Union[torch.Tensor, Dict[str, torch.Tensor]], device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def reduce_metrics(sums: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """``{name: tensor([sum, count])}`` (already summed across ranks) -> ``{name: sum/count}``."""
    return {k: (float(v[0] / v[1]) if float(v[1]) else float("nan")) for k, v in sums.items()}


def accumulate(into: Dict[str, torch.Tensor], metrics: Dict[str, Any], device: torch.device) -> None:
    """Add one micro-batch's ``(sum, count)`` pairs into float64 2-vectors (no host sync)."""
    for k, (s, c) in metrics.items():
        vec = into.get(k)
        if vec is None:
            vec = into[k] = torch.zeros(2, dtype=torch.float64, device=device)
        vec[0] += torch.as_tensor(s, device=device).detach().double()
        vec[1] += torch.as_tensor(c, device=device).detach().double()
