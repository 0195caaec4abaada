"""Knowledge distillation (``task=distill``): a causal-LM student learns from a frozen teacher.

``loss = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, next token)``
per token, averaged over the micro-batch; ``p^T = softmax(logits / T)``. The T^2 factor keeps the
soft term's gradients at the scale of the hard one as T grows (Hinton et al., 2015).

The teacher (``task.distill.teacher``: one of our checkpoints or a Hugging Face directory, read
with the ``model.init_from`` machinery) is a plain module built on first use on the rank's
device, in eval mode with ``requires_grad=False``: it is never handed to the engine, so
DeepSpeed (any ZeRO stage) neither wraps, partitions nor gives it optimizer state, and the
checkpoint holds only the student. It runs in bf16 where the device supports it
(``teacher_dtype=auto``: CUDA with bf16), else fp32. Evaluation reports the student's plain CE as
the loss (comparable to a run without a teacher; it is also what best/ is chosen by) and the KL
as the ``distill_kl`` metric.

The teacher must read the same token ids as the student: its tokenizer (the teacher's own
tokenizer files or training data) must encode like the student's training data, and the two
vocabularies must have the same size; both are checked when the task is built, before any
process group starts, with an error naming both sides.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dist_llm.config.schema import JobConfig, ModelConfig
from dist_llm.train.tasks.base import TOKENS, Batch, Metrics, Task, register_task

PROBE = "def main(argv):\n    return {'héllo wörld': [1, 2, 3]}  # ✓\n"


class DistillError(ValueError):
    pass


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 temperature: float, alpha: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl_sum, ce_sum, n_tokens) over the positions whose target is not -100; ``loss`` is
    the per-token mean of ``alpha * T^2 * KL + (1 - alpha) * CE``."""
    vocab = student_logits.shape[-1]
    keep = (targets != -100).reshape(-1)
    s = student_logits.float().reshape(-1, vocab)[keep]
    t = teacher_logits.float().reshape(-1, vocab)[keep]
    n = keep.sum()
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl_sum = F.kl_div(log_ps, log_pt, log_target=True, reduction="sum")
    ce_sum = F.cross_entropy(s, targets.reshape(-1)[keep], reduction="sum")
    denom = n.clamp(min=1)
    loss = (alpha * temperature ** 2 * kl_sum + (1.0 - alpha) * ce_sum) / denom
    return loss, kl_sum.detach(), ce_sum.detach(), n


def _teacher_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float32


def _data_tokenizer(cfg: JobConfig):
    """(tokenizer of the student's training data or None, where it was found)."""
    from dist_llm.data.tokenizer import ByteTokenizer
    from dist_llm.interop.run_tokenizer import manifest_tokenizer

    for src in cfg.data.train:
        tok = manifest_tokenizer(Path(src.path))
        if tok is not None:
            return tok, str(src.path)
    if cfg.data.build_embedded:
        return ByteTokenizer(), f"{cfg.data.embedded_dir} (embedded corpus, byte tokenizer)"
    return None, "data.train"


def _describe(tok) -> str:
    return f"{tok.kind} tokenizer, {tok.vocab_size} tokens"


def check_teacher_matches(teacher_path: str, teacher_cfg: ModelConfig, teacher_tok, cfg: JobConfig) -> None:
    """The teacher scores the student's token ids: same vocabulary size and the same encoding."""
    where = f"task.distill.teacher={teacher_path}"
    if teacher_cfg.vocab_size != cfg.model.vocab_size:
        raise DistillError(f"{where} has vocab_size={teacher_cfg.vocab_size} but the student's model.vocab_size="
                           f"{cfg.model.vocab_size}: the distributions must cover the same vocabulary; use a "
                           f"student with model.vocab_size={teacher_cfg.vocab_size} and the teacher's tokenizer")
    data_tok, data_where = _data_tokenizer(cfg)
    if teacher_tok is None:
        raise DistillError(f"{where}: cannot find the teacher's tokenizer (no tokenizer.json, and its training "
                           f"data manifest is not reachable from here), so it cannot be checked against the "
                           f"student's data ({data_where}); copy the teacher's tokenizer.json next to its weights")
    if data_tok is None:
        raise DistillError(f"the student's training data ({data_where}) has no manifest.json naming its "
                           f"tokenizer; prepare it with `dist-llm prepare` using the teacher's tokenizer")
    if data_tok.vocab_size != teacher_tok.vocab_size or data_tok.encode(PROBE) != teacher_tok.encode(PROBE):
        raise DistillError(f"{where} uses a different tokenizer ({_describe(teacher_tok)}) than the student's "
                           f"training data {data_where} ({_describe(data_tok)}): the teacher would score other "
                           f"tokens; re-prepare the data with the teacher's tokenizer (`dist-llm prepare "
                           f"tokenizer=file tokenizer.path=<teacher>/tokenizer.json`) or pick a matching teacher")


@register_task("distill")
class DistillTask(Task):
    sample_format = TOKENS

    def __init__(self, cfg: JobConfig, teacher: Optional[nn.Module] = None) -> None:
        """``teacher``: an in-memory teacher (benchmarks, tests); else ``task.distill.teacher`` is
        located and checked now (config and tokenizer files only; weights load on first use)."""
        super().__init__(cfg)
        self.opts = cfg.task.distill
        self._teacher = teacher
        self._source = None
        if teacher is None:
            from dist_llm.interop.init_from import locate, merge_model_config, source_tokenizer

            if not self.opts.teacher:
                raise DistillError("task=distill needs task.distill.teacher=<checkpoint, run dir or HF directory>")
            self._source = locate(self.opts.teacher, what="task.distill.teacher")
            self._teacher_cfg = merge_model_config(ModelConfig(), self._source)
            check_teacher_matches(self.opts.teacher, self._teacher_cfg, source_tokenizer(self._source), cfg)

    def build_model(self, cfg: JobConfig) -> nn.Module:
        from dist_llm.models import build_model

        return build_model(cfg.model)

    def flops_per_token(self, cfg: JobConfig) -> float:
        from dist_llm.models import flops_per_token

        return flops_per_token(cfg.model, cfg.train.seq_len)  # the student's; the teacher's forward is extra

    def teacher(self, device: torch.device) -> nn.Module:
        """The frozen teacher on ``device`` (loaded once, on first use)."""
        if self._teacher is None:
            from dist_llm.interop.init_from import load_into, load_source_weights
            from dist_llm.models import build_model

            model = build_model(self._teacher_cfg)
            load_into(model, load_source_weights(self._source, self._teacher_cfg), str(self._source.path))
            self._teacher = model
        t = self._teacher
        dtype = _teacher_dtype(self.opts.teacher_dtype, device)
        if next(t.parameters()).device != device or next(t.parameters()).dtype != dtype:
            t.to(device=device, dtype=dtype)
        t.eval()
        t.requires_grad_(False)
        return t

    def loss(self, model, batch: Batch) -> Tuple[torch.Tensor, Metrics]:
        assert isinstance(batch, torch.Tensor), "distill takes [B, T+1] token ids"
        inputs, targets = batch[:, :-1], batch[:, 1:]
        student_logits = model(inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(inputs.device)(inputs)
        loss, kl_sum, ce_sum, n = distill_loss(student_logits, teacher_logits, targets,
                                               self.opts.temperature, self.opts.alpha)
        metrics = {"distill_kl": (kl_sum, n), "distill_ce": (ce_sum, n)}
        if not getattr(model, "training", True):  # eval: the student's own CE (comparable to plain runs)
            return ce_sum / n.clamp(min=1), metrics
        return loss, metrics
