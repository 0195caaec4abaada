"""BERT (task=mlm_nsp) on the Megatron ``pp = 1`` engine: the arch strategy and the loss under TP.

The loss and the four metrics are those of :class:`~dist_llm.train.tasks.mlm_nsp.MlmNspTask`
(``mlm + nsp``, each a mean; ``mlm_loss``/``mlm_accuracy`` per masked token, ``nsp_loss``/
``nsp_accuracy`` per pair, as (sum, count) pairs), computed without ever gathering the
vocabulary: the MLM cross entropy is Megatron's vocab-parallel one on each TP rank's slice of
the logits, and the MLM argmax combines each rank's local maximum (one small all-gather over TP
of ``[max, index]`` per masked position; ties go to the lowest index, as ``argmax`` does).
Every TP rank of a replica computes the same numbers; the engine counts TP rank 0's.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from dist_llm.models.bert import IGNORE_INDEX
from dist_llm.parallel.engine import batch_to
from dist_llm.parallel.megatron import bert_model as bm
from dist_llm.parallel.megatron.arch import MegatronArch

Metrics = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


class BertArch(MegatronArch):
    supports_pipeline = False  # validate() refuses pp > 1 for BERT

    def transformer_config(self, par, dtype: torch.dtype):
        return bm.transformer_config(self.mcfg, par.tp, dtype)

    def build_chunks(self, tcfg, vpp: int):
        return bm.build_chunks(self.mcfg, tcfg)

    def to_megatron(self, plain):
        return bm.plain_to_megatron(plain, self.mcfg)

    def to_plain(self, full):
        return bm.megatron_to_plain(full, self.mcfg)

    def local_params(self, chunk):
        return bm.local_params(chunk)

    def micro_batch_loss(self, engine, module: torch.nn.Module, mb: Any) -> Tuple[torch.Tensor, Metrics]:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        b = batch_to(mb, engine.layout.device)
        labels, nsp_labels = b["mlm_labels"], b["nsp_labels"].reshape(-1)
        # logits: [B, T, vocab / tp] (this rank's vocabulary slice); nsp: [B, 2] on every TP rank
        logits, nsp_logits = module(b["input_ids"], b["attention_mask"].long(), tokentype_ids=b["token_type_ids"])
        keep = labels != IGNORE_INDEX
        n_mask = keep.sum()
        ce = vocab_parallel_cross_entropy(logits.float(), labels.masked_fill(~keep, 0))  # [B, T]
        mlm = (ce * keep).sum() / n_mask.clamp(min=1)  # 0 (graph kept) when nothing is masked
        nsp = torch.nn.functional.cross_entropy(nsp_logits.float(), nsp_labels)
        with torch.no_grad():
            mlm_correct = (vocab_parallel_argmax(logits[keep], engine.layout) == labels[keep]).sum()
            nsp_correct = (nsp_logits.argmax(-1) == nsp_labels).sum()
        n_pair = torch.tensor(nsp_labels.numel(), device=nsp_labels.device)
        metrics: Metrics = {"mlm_loss": (mlm.detach() * n_mask, n_mask), "mlm_accuracy": (mlm_correct, n_mask),
                            "nsp_loss": (nsp.detach() * n_pair, n_pair), "nsp_accuracy": (nsp_correct, n_pair)}
        return mlm + nsp, metrics


@torch.no_grad()
def vocab_parallel_argmax(local_logits: torch.Tensor, layout) -> torch.Tensor:
    """Global vocabulary index of the maximum of ``[N, vocab / tp]`` logits split over TP ranks
    in rank order (the first maximum on ties, as ``torch.argmax`` over the full row)."""
    mx, idx = local_logits.max(-1)
    idx = idx + layout.tp_rank * local_logits.shape[-1]
    if layout.tp == 1:
        return idx
    mine = torch.stack([mx.double(), idx.double()])  # [2, N]; float64 holds any vocabulary index exactly
    parts = [torch.empty_like(mine) for _ in range(layout.tp)]
    layout.all_gather(parts, mine, group=layout.tp_group)
    every = torch.stack(parts)  # [tp, 2, N]
    best = every[:, 0].argmax(0)  # the first rank holding the maximum = the lowest index
    return every[:, 1].gather(0, best.unsqueeze(0)).squeeze(0).long()
