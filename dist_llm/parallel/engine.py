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
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn


@dataclass
class StepStats:
    loss: float  # mean over the global batch (all micro-batches, all data-parallel ranks)
    grad_norm: float  # global 2-norm before clipping (nan when the engine does not compute it)
    # Seconds per phase of this step (``fwd_bwd_s``, ``optim_s``, ``comm_s``) where the engine can
    # tell them apart; empty otherwise. The trainer logs them as ``time/*``.
    timings: Dict[str, float] = field(default_factory=dict)


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
    supports_sharded: bool = False  # has save_sharded/load_sharded
    reshardable: bool = False  # its sharded checkpoints load at another world size / tp / pp
    phase_sync: Optional[Any] = None  # set by the trainer when train.ui.breakdown is on (GPU)

    def phase_clock(self) -> PhaseClock:
        return PhaseClock(self.phase_sync)

    @property
    def checkpoint_name(self) -> str:
        """Recorded as ``engine`` in a checkpoint's manifest; a checkpoint restores optimizer
        state and sharded files only into an engine of the same name."""
        return type(self).__name__

    def train_step(self, micro_batches: List[torch.Tensor], lr: float) -> StepStats:
        """Forward/backward every micro-batch ([B, T+1] token ids), then one optimizer step."""
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

    def save_sharded(self, directory: Path) -> None:
        """Write weights + optimizer state into ``directory`` (collective)."""
        raise NotImplementedError(f"{type(self).__name__} writes no sharded checkpoint "
                                  f"(supports_sharded is False)")

    def load_sharded(self, directory: Path) -> None:
        """Restore what :meth:`save_sharded` wrote, possibly at another layout (collective)."""
        raise NotImplementedError(f"{type(self).__name__} loads no sharded checkpoint "
                                  f"(supports_sharded is False)")
