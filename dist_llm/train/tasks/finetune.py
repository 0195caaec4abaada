"""Fine-tuning objectives on text: ``classify`` for GPT/BERT (``pack=classify`` shards) and
``sft`` (``pack=sft`` shards), plus freezing and LoRA applied to any task's model.

* Text classification puts a linear head on the *last real token* of a GPT (the only position
  that has seen the whole text under causal attention) or on BERT's pooled ``[CLS]``. The head
  is a submodule ``cls_head`` of the backbone, so the backbone's state-dict keys stay those of
  a pretrain checkpoint (``model.init_from`` loads them; the head starts fresh).
* SFT is the causal LM loss with targets already -100 outside response tokens (the packer's
  loss mask), so prompt tokens never contribute to the loss or its gradients.
* Metrics are (sum, count) pairs: ``accuracy`` and, per class, true positives / predicted /
  actual counts from which :func:`macro_f1` is computed after the cross-rank sum.
"""
from __future__ import annotations

import io
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dist_llm.config.schema import JobConfig
from dist_llm.data.shards import CLASSIFY_FORMAT, SFT_FORMAT
from dist_llm.parallel.deepspeed_common import layer_index  # noqa: F401  (re-exported)
from dist_llm.train.tasks.base import _REGISTRY, Batch, Metrics, Task, register_task

IGNORE_INDEX = -100


def _npy(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def gpt_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states [B, T, d] of our GPT (its forward without the LM head)."""
    T = input_ids.shape[1]
    x = model.tok_emb(input_ids)
    if model.pos_emb is not None:
        x = x + model.pos_emb(torch.arange(T, device=x.device))
    rope = (model.rope_cos[:T], model.rope_sin[:T]) if model.rope_cos is not None else None
    x = model.emb_dropout(x)
    for i, block in enumerate(model.blocks):
        x = block(x, rope, None, None, i)
    return model.final_norm(x)


def classify_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B, classes]: the head on BERT's pooled [CLS] or on a GPT's last real token."""
    ids = batch["input_ids"]
    if hasattr(model, "encode"):  # BERT
        _, pooled = model.encode(ids, attention_mask=batch["attention_mask"])
        return model.cls_head(pooled).float()
    h = gpt_hidden(model, ids)
    last = (batch["lengths"] - 1).clamp(min=0)
    return model.cls_head(h[torch.arange(ids.shape[0], device=ids.device), last]).float()


def classify_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Metrics:
    pred = logits.argmax(-1)
    n = torch.tensor(labels.numel(), device=labels.device)
    out: Metrics = {"accuracy": ((pred == labels).sum(), n)}
    for c in range(num_classes):  # per class: tp over (predicted + actual) / 2 = F1 after summing
        tp = ((pred == c) & (labels == c)).sum()
        out[f"f1_class{c}"] = (2 * tp, (pred == c).sum() + (labels == c).sum())
    return out


def macro_f1(metrics: Mapping[str, float]) -> float:
    """Mean of the per-class F1 values in reduced metrics (classes never seen nor predicted skip)."""
    vals = [v for k, v in metrics.items() if k.startswith("f1_class") and v == v]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def freeze_layers(model: nn.Module, n: int) -> None:
    """Freeze the embeddings and the first ``n`` blocks (GPT ``blocks``, BERT ``layers``)."""
    if n <= 0:
        return
    blocks = getattr(model, "blocks", None) or getattr(model, "layers")
    if n > len(blocks):
        raise ValueError(f"task.freeze_layers={n} but the model has {len(blocks)} blocks")
    for name, p in model.named_parameters():
        if name.split(".")[0] in ("tok_emb", "pos_emb", "type_emb", "emb_norm"):
            p.requires_grad = False
    for block in list(blocks)[:n]:
        for p in block.parameters():
            p.requires_grad = False


def apply_finetune_options(model: nn.Module, cfg: JobConfig) -> nn.Module:
    """``task.freeze_layers`` then ``task.lora`` (LoRA freezes the rest itself)."""
    t = cfg.task
    freeze_layers(model, int(getattr(t, "freeze_layers", 0)))
    lora = getattr(t, "lora", None)
    if lora is not None and lora.rank > 0:
        from dist_llm.models.lora import LoraSpec, apply_lora

        apply_lora(model, LoraSpec(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                                   target_modules=list(lora.target_modules), train_also=list(lora.train_also)))
    return model


class TextClassifyTask(Task):
    """``task=classify`` on a GPT or BERT preset (the image variant serves ``model=vit_*``)."""

    kind = "classify"
    sample_format = CLASSIFY_FORMAT

    def build_model(self, cfg: JobConfig) -> nn.Module:
        from dist_llm.models import build_model

        model = build_model(cfg.model)
        d = cfg.model.d_model
        model.cls_head = nn.Linear(d, cfg.model.num_classes)
        nn.init.normal_(model.cls_head.weight, std=0.02)
        nn.init.zeros_(model.cls_head.bias)
        return apply_finetune_options(model, cfg)

    def setup_data(self, manifest: Mapping[str, Any]) -> None:
        classes = manifest.get("classes") or []
        if len(classes) > self.cfg.model.num_classes:
            raise ValueError(f"the data has {len(classes)} classes but model.num_classes={self.cfg.model.num_classes}: "
                             f"set model.num_classes={len(classes)}")

    def decode_batch(self, samples: Sequence[Mapping[str, Any]], step: int,
                     sample_indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.stack([_npy(s["tokens.npy"]).astype(np.int64) for s in samples]))
        lengths = torch.tensor([int(s["len"]) for s in samples], dtype=torch.long)
        labels = torch.tensor([int(s["cls"]) for s in samples], dtype=torch.long)
        mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        return {"input_ids": ids, "lengths": lengths, "labels": labels, "attention_mask": mask}

    def decode_eval_batch(self, samples: Sequence[Mapping[str, Any]], sample_indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        return self.decode_batch(samples, 0, sample_indices)

    def loss(self, model, batch: Batch) -> Tuple[torch.Tensor, Metrics]:
        assert isinstance(batch, dict)
        logits = classify_logits(getattr(model, "module", model), batch)
        loss = F.cross_entropy(logits, batch["labels"])
        n = torch.tensor(batch["labels"].numel(), device=logits.device)
        return loss, {"loss": (loss.detach() * n, n), **classify_metrics(logits, batch["labels"],
                                                                          self.cfg.model.num_classes)}


def sft_loss(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over response targets only (-100 elsewhere)."""
    logits = model(input_ids)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)


@register_task("sft")
class SftTask(Task):
    sample_format = SFT_FORMAT

    def build_model(self, cfg: JobConfig) -> nn.Module:
        from dist_llm.models import build_model

        return apply_finetune_options(build_model(cfg.model), cfg)

    def setup_data(self, manifest: Mapping[str, Any]) -> None:
        self.pad = (manifest.get("special_ids") or {}).get("pad")

    def decode_batch(self, samples: Sequence[Mapping[str, Any]], step: int,
                     sample_indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        from dist_llm.data.labelled import sft_targets

        toks = torch.from_numpy(np.stack([_npy(s["tokens.npy"]).astype(np.int64) for s in samples]))
        mask = torch.from_numpy(np.stack([_npy(s["mask.npy"]) for s in samples]))
        return {"input_ids": toks[:, :-1].contiguous(), "targets": sft_targets(toks, mask)}

    def decode_eval_batch(self, samples: Sequence[Mapping[str, Any]], sample_indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        return self.decode_batch(samples, 0, sample_indices)

    def loss(self, model, batch: Batch) -> Tuple[torch.Tensor, Metrics]:
        assert isinstance(batch, dict)
        loss = sft_loss(model, batch["input_ids"], batch["targets"])
        n = (batch["targets"] != IGNORE_INDEX).sum()
        return loss, {"loss": (loss.detach() * n, n)}


def _register_text_classify() -> None:
    """``task=classify`` picks the text task for GPT/BERT presets and the image task for ViT."""
    image = _REGISTRY["classify"]

    def make(cfg: JobConfig) -> Task:
        return image(cfg) if str(cfg.model.preset) == "vit" else TextClassifyTask(cfg)

    _REGISTRY["classify"] = make


_register_text_classify()

__all__ = ["TextClassifyTask", "SftTask", "classify_logits", "classify_metrics", "macro_f1", "freeze_layers",
           "layer_index", "apply_finetune_options", "gpt_hidden", "sft_loss"]
