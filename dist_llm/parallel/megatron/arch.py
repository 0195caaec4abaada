"""What the Megatron engines need to know about the architecture they train, as one object.

The engines (:mod:`~dist_llm.parallel.megatron.base` and its two optimizer paths) own layout,
optimizer, checkpoints and the step; an arch strategy owns the model-specific parts: the
``TransformerConfig``, building the Megatron chunks, the plain <-> Megatron adapter, the
tensor-parallel slicing of a full tensor, and the loss of one micro-batch.

* :class:`GPTArch`: our GPT presets as ``GPTModel`` (causal LM on ``[B, T+1]`` token ids), every
  layout (tp, pp, vpp, sp);
* :class:`~dist_llm.parallel.megatron.bert_arch.BertArch`: our BERT as ``BertModel`` (MLM + NSP
  on the mlm_nsp task's batch dicts), ``pp = 1`` only.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from dist_llm.parallel.megatron import model as mm

Tensors = Dict[str, torch.Tensor]


class MegatronArch:
    """The interface; :class:`GPTArch` documents each method."""

    supports_pipeline = True

    def __init__(self, mcfg: Any):
        self.mcfg = mcfg  # the plain model's config (resolved defaults)

    def transformer_config(self, par, dtype: torch.dtype): raise NotImplementedError

    def build_chunks(self, tcfg, vpp: int) -> List[torch.nn.Module]: raise NotImplementedError

    def to_megatron(self, plain: Tensors) -> Tensors: raise NotImplementedError

    def to_plain(self, full: Tensors) -> Tensors: raise NotImplementedError

    def local_params(self, chunk: torch.nn.Module) -> Dict[str, torch.nn.Parameter]: raise NotImplementedError

    def tp_slice(self, name: str, full: torch.Tensor, pdim: Optional[int], rank: int, size: int) -> torch.Tensor:
        return mm.tp_slice(name, full, pdim, rank, size, gated=False)

    def tp_merge(self, name: str, parts: List[torch.Tensor], pdim: Optional[int]) -> torch.Tensor:
        return mm.tp_merge(name, parts, pdim, gated=False)

    def micro_batch_loss(self, engine, module: torch.nn.Module, mb: Any) -> Any:
        """The mean loss of one micro-batch, or ``(loss, {name: (sum, count)})`` with the task's
        metrics (summed over micro-batches and the loss-reporting ranks by the engine)."""
        raise NotImplementedError


class GPTArch(MegatronArch):
    def __init__(self, mcfg: Any):
        super().__init__(mcfg)
        self.gated = mcfg.preset == "llama"  # SwiGLU's [gate; up] fc1 slices per half

    def transformer_config(self, par, dtype: torch.dtype):
        return mm.transformer_config(self.mcfg, par.tp, par.pp, par.vpp, par.sp, dtype)

    def build_chunks(self, tcfg, vpp: int) -> List[torch.nn.Module]:
        return mm.build_chunks(self.mcfg, tcfg, vpp)

    def to_megatron(self, plain: Tensors) -> Tensors:
        return mm.plain_to_megatron(plain, self.mcfg)

    def to_plain(self, full: Tensors) -> Tensors:
        return mm.megatron_to_plain(full, self.mcfg)

    def local_params(self, chunk: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
        return mm.local_params(chunk)

    def tp_slice(self, name, full, pdim, rank, size):
        return mm.tp_slice(name, full, pdim, rank, size, self.gated)

    def tp_merge(self, name, parts, pdim):
        return mm.tp_merge(name, parts, pdim, self.gated)

    def micro_batch_loss(self, engine, module, mb):
        return engine.per_token_loss(module, mb).float().mean()
