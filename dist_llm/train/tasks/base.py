"""The Task interface: what turns a batch into a loss and metrics.

A task is an object the trainer and the engines call; they never branch on the objective. The
``task`` config group (``conf/task/<kind>.yaml``, :class:`~dist_llm.config.schema.TaskConfig`)
selects one by ``task.kind`` through :func:`build_task`.

Contract:

* :meth:`Task.build_model` builds the plain ``nn.Module`` (same weights on every rank: the
  caller seeds first).
* :meth:`Task.decode_batch` turns one micro-batch of shard samples (``read_records``-style dicts)
  into tensors. ``step`` is the training step and ``sample_indices`` each sample's **global**
  index within the step's global batch, so every random choice (MLM masking, augmentation) is a
  function of ``(seed, step, index)`` alone: independent of dp and exact on resume. Tasks whose
  ``sample_format`` is causal token windows (pretrain) are fed ``[B, T+1]`` id tensors directly
  (the loader's fast path) and never decode.
* :meth:`Task.loss` runs the model (plain or engine-wrapped; anything callable like the plain
  model) on a batch already on the device and returns ``(loss, metrics)``: ``loss`` a scalar
  to back-propagate (the micro-batch mean) and ``metrics`` ``{name: (sum, count)}`` tensor pairs
  that the engine sums over micro-batches *and* data-parallel ranks before dividing (one
  all-reduce per step), e.g. ``"mlm_accuracy": (correct, predicted)``.
* Which task runs on which preset and engine is checked by ``config/validate.py``
  (``_task_problems``) before any process group starts.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from dist_llm.config.schema import JobConfig
from dist_llm.parallel.engine import accumulate, batch_to, reduce_metrics  # noqa: F401  (re-exported)

Batch = Union[torch.Tensor, Dict[str, torch.Tensor]]
Metrics = Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # name -> (sum, count); summed across ranks

# Shard formats a task can read (the manifest's "format"); kept as strings so config-free code
# (validation) can compare them too.
TOKENS = "dist-llm-tokens/1"
PAIRS = "dist-llm-pairs/1"
IMAGES = "dist-llm-images/1"


class Task:
    kind: str = "?"
    sample_format: str = TOKENS  # what the loader must serve
    # the value logged as the eval "loss" selects best/; tasks may prefer another metric later
    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg

    def build_model(self, cfg: JobConfig) -> nn.Module:
        raise NotImplementedError

    def decode_batch(self, samples: Sequence[Mapping[str, Any]], step: int,
                     sample_indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError(f"task {self.kind} reads token windows, it does not decode records")

    def decode_eval_batch(self, samples: Sequence[Mapping[str, Any]],
                          sample_indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        """Validation batches: fixed randomness (step 0), no augmentation unless overridden."""
        return self.decode_batch(samples, 0, sample_indices)

    def setup_data(self, manifest: Mapping[str, Any]) -> None:
        """Called once with the training data's manifest (special ids, classes) before decoding;
        raises naming the field when the data does not fit the model."""

    def loss(self, model: Callable[..., Any], batch: Batch) -> Tuple[torch.Tensor, Metrics]:
        raise NotImplementedError

    def flops_per_token(self, cfg: JobConfig) -> float:
        """Training FLOPs per token for MFU; 0 = not reported."""
        return 0.0

    def batch_size(self, batch: Batch) -> int:
        """Samples in a micro-batch (weights the eval mean)."""
        if isinstance(batch, torch.Tensor):
            return int(batch.shape[0])
        return int(next(iter(batch.values())).shape[0])


_REGISTRY: Dict[str, Callable[[JobConfig], Task]] = {}


def register_task(kind: str) -> Callable[[type], type]:
    """Class decorator: ``@register_task("sft") class SftTask(Task): ...``."""
    def deco(cls: type) -> type:
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls
    return deco


def registered_kinds() -> List[str]:
    return sorted(_REGISTRY)


def build_task(cfg: JobConfig) -> Task:
    kind = str(cfg.task.kind)
    if kind not in _REGISTRY:
        raise ValueError(f"task.kind={kind} has no implementation in this build (available: "
                         f"{', '.join(registered_kinds())}); pick another task=... group")
    return _REGISTRY[kind](cfg)
