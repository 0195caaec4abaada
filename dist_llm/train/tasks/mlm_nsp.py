"""BERT pretraining: masked LM + next-sentence prediction on ``pack=bert`` shards.

Masking happens here, at decode time, from ``(task.mlm_nsp.mask_seed, step, global sample
index)`` (:mod:`dist_llm.data.masking`), so it does not depend on dp or workers and a resumed
run masks exactly as an uninterrupted one. The loss is ``mlm + nsp`` (each a mean); the four
metrics are logged separately as (sum, count) pairs summed over micro-batches and ranks:
``mlm_loss`` per masked token, ``mlm_accuracy`` over masked tokens, ``nsp_loss`` and
``nsp_accuracy`` per pair.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Tuple

import torch
from torch import nn

from dist_llm.config.schema import JobConfig
from dist_llm.train.tasks.base import PAIRS, Batch, Metrics, Task, register_task


@register_task("mlm_nsp")
class MlmNspTask(Task):
    sample_format = PAIRS

    def __init__(self, cfg: JobConfig) -> None:
        super().__init__(cfg)
        self.special_ids: Dict[str, int] = {}
        self.vocab_size = cfg.model.vocab_size

    def build_model(self, cfg: JobConfig) -> nn.Module:
        from dist_llm.models import build_model

        return build_model(cfg.model)

    def setup_data(self, manifest: Mapping[str, Any]) -> None:
        sp = dict(manifest.get("special_ids") or (manifest.get("tokenizer") or {}).get("special_ids") or {})
        missing = [k for k in ("pad", "mask", "cls", "sep") if k not in sp]
        if missing:
            raise ValueError(f"the BERT data's tokenizer has no {missing} special token(s): prepare it with "
                             f"`dist-llm prepare pack=bert tokenizer=char` (or bpe), not the byte tokenizer")
        if sp["pad"] != 0:
            raise ValueError(f"the BERT data pads with id {sp['pad']} but the model's padding id is 0: "
                             f"prepare it with tokenizer=char or tokenizer=bpe")
        vocab = int(manifest.get("vocab_size") or 0)
        if vocab > self.cfg.model.vocab_size:
            raise ValueError(f"the BERT data uses {vocab} token ids but model.vocab_size="
                             f"{self.cfg.model.vocab_size}: set model.vocab_size >= {vocab}")
        self.special_ids, self.vocab_size = sp, vocab

    def decode_batch(self, samples: Sequence[Mapping[str, Any]], step: int,
                     sample_indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        from dist_llm.data.batches import decode_bert_batch

        t = self.cfg.task.mlm_nsp
        return decode_bert_batch(samples, self.special_ids, self.vocab_size, t.mask_seed, step, sample_indices,
                                 t.mlm_prob)

    def loss(self, model, batch: Batch) -> Tuple[torch.Tensor, Metrics]:
        from dist_llm.models.bert import IGNORE_INDEX, mlm_loss, nsp_loss

        assert isinstance(batch, dict)
        mlm_logits, nsp_logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        labels, nsp_labels = batch["mlm_labels"], batch["nsp_labels"]
        mlm, nsp = mlm_loss(mlm_logits, labels), nsp_loss(nsp_logits, nsp_labels)
        keep = labels != IGNORE_INDEX
        n_mask, n_pair = keep.sum(), torch.tensor(nsp_labels.numel(), device=nsp_labels.device)
        mlm_correct = (mlm_logits.argmax(-1)[keep] == labels[keep]).sum()
        nsp_correct = (nsp_logits.argmax(-1) == nsp_labels.reshape(-1)).sum()
        metrics: Metrics = {"mlm_loss": (mlm.detach() * n_mask, n_mask), "mlm_accuracy": (mlm_correct, n_mask),
                            "nsp_loss": (nsp.detach() * n_pair, n_pair), "nsp_accuracy": (nsp_correct, n_pair)}
        return mlm + nsp, metrics
