"""Which :class:`~dist_llm.parallel.megatron.arch.MegatronArch` a plain model gets (GPT or BERT);
apart from ``arch.py`` so the strategies can import their base without a cycle."""
from __future__ import annotations

import torch

from dist_llm.parallel.megatron.arch import GPTArch, MegatronArch


def arch_for(model: torch.nn.Module) -> MegatronArch:
    """The strategy for the plain model the engine was given."""
    from dist_llm.models.bert import Bert

    if isinstance(model, Bert):
        from dist_llm.parallel.megatron.bert_arch import BertArch  # builds Megatron's BERT: only when asked

        return BertArch(model.cfg)
    from dist_llm.models.gpt import GPT

    if isinstance(model, GPT):
        return GPTArch(model.cfg)
    raise ValueError(f"parallel.engine=megatron has no Megatron model for {type(model).__name__}: it trains GPT "
                     f"(gpt2/llama) and BERT (task=mlm_nsp); use parallel.engine=deepspeed (see docs/parallelism.md)")
