"""The interface the trainer talks to. DeepSpeed (ZeRO data parallelism) and Megatron-core
(tensor/pipeline parallelism, ZeRO over the DP group) implement it.

The trainer never sees DeepSpeed or Megatron objects: it hands over micro-batches and a learning
rate and gets numbers back, and it saves/loads state through these methods.

Optional, for engines whose checkpoints reshard (the Megatron engine): ``save_sharded(dir)`` /
``load_sharded(dir)`` (collective; the checkpoint manager calls them inside the step's tmp
directory before the commit, and prefers them on load) and ``reshardable = True`` (the manager
then accepts a checkpoint saved at another world size / tp / pp).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Protocol

import torch
from torch import nn


@dataclass
class StepStats:
    loss: float  # mean over the global batch (all micro-batches, all data-parallel ranks)
    grad_norm: float  # global 2-norm before clipping (nan when the engine does not compute it)


class Engine(Protocol):
    model: nn.Module  # the plain model (unwrapped), e.g. for generation

    def train_step(self, micro_batches: List[torch.Tensor], lr: float) -> StepStats:
        """Forward/backward every micro-batch ([B, T+1] token ids), then one optimizer step."""

    def eval_loss(self, micro_batches: List[torch.Tensor]) -> float:
        """Mean token loss over these micro-batches on all data-parallel ranks (no grad)."""

    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        """Full fp32 weights in the plain model's names. Collective: every rank must call it."""

    def load_model_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Load full weights (same names). Collective."""

    def optimizer_state(self) -> Dict[str, Any]:
        """This rank's optimizer state: only tensors and plain Python values (safe to load
        with ``torch.load(weights_only=True)``)."""

    def load_optimizer_state(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`optimizer_state` returned on the same rank of the same layout."""
