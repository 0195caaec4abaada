"""Fine-tuning tasks in process: SFT ignores prompt tokens, text classify heads and metrics,
freezing and layer-wise LR decay groups."""
from __future__ import annotations

import torch

from dist_llm.config.schema import JobConfig, ModelConfig
from dist_llm.data.labelled import sft_targets
from dist_llm.models import GPT
from dist_llm.parallel.deepspeed_common import param_groups
from dist_llm.train.tasks import build_task
from dist_llm.train.tasks.finetune import TextClassifyTask, classify_metrics, freeze_layers, macro_f1
from dist_llm.parallel.engine import reduce_metrics


def _cfg(kind: str, **task) -> JobConfig:
    cfg = JobConfig()
    cfg.task.kind = kind
    m = cfg.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.max_seq_len, m.num_classes = 64, 32, 3, 4, 16, 3
    for k, v in task.items():
        setattr(cfg.task, k, v)
    return cfg


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_sft_loss_ignores_prompt_tokens() -> None:
    task = build_task(_cfg("sft"))
    torch.manual_seed(0)
    model = task.build_model(task.cfg)
    toks = torch.randint(0, 64, (2, 17))
    mask = torch.zeros(2, 17, dtype=torch.uint8)
    mask[:, 10:] = 1  # response = tokens 10..16
    batch = {"input_ids": toks[:, :-1], "targets": sft_targets(toks, mask)}
    loss_a, _ = task.loss(model, batch)
    grads_a = _grads(model, loss_a)
    # change every prompt *target* (tokens 1..9 as targets): the loss and gradients must not move
    other = toks.clone()
    other[:, 1:10] = (other[:, 1:10] + 7) % 64
    batch_b = {"input_ids": toks[:, :-1], "targets": sft_targets(other, mask)}
    loss_b, m = task.loss(model, batch_b)
    grads_b = _grads(model, loss_b)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    assert int(m["loss"][1]) == 2 * 7  # only the response targets count
    # and changing a response target does change it
    other[:, 12] = (other[:, 12] + 1) % 64
    loss_c, _ = task.loss(model, {"input_ids": toks[:, :-1], "targets": sft_targets(other, mask)})
    assert not torch.equal(loss_a, loss_c)


def test_text_classify_reads_last_real_token_and_ignores_padding() -> None:
    task = build_task(_cfg("classify"))
    assert isinstance(task, TextClassifyTask)
    torch.manual_seed(0)
    model = task.build_model(task.cfg).eval()
    ids = torch.randint(0, 64, (2, 16))
    lengths = torch.tensor([5, 16])
    batch = {"input_ids": ids, "lengths": lengths, "labels": torch.tensor([0, 2]),
             "attention_mask": torch.arange(16)[None] < lengths[:, None]}
    loss, metrics = task.loss(model, batch)
    padded = dict(batch, input_ids=ids.clone())
    padded["input_ids"][0, 5:] = 0  # what follows the last real token cannot matter (causal)
    loss2, _ = task.loss(model, padded)
    torch.testing.assert_close(loss, loss2)
    assert set(metrics) == {"loss", "accuracy", "f1_class0", "f1_class1", "f1_class2"}


def test_macro_f1_from_summed_pairs() -> None:
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    labels = torch.tensor([0, 1, 1, 2])
    red = reduce_metrics({k: torch.stack([a.double(), b.double()]) for k, (a, b) in
                          classify_metrics(logits, labels, 3).items()})
    # class 0: P=1 R=1/... tp=1, pred=2, actual=1 -> 2/3; class 1: tp=1, pred=1, actual=2 -> 2/3; class 2: 1
    assert abs(red["accuracy"] - 0.75) < 1e-9
    assert abs(macro_f1(red) - (2 / 3 + 2 / 3 + 1) / 3) < 1e-9


def test_freeze_layers_and_layer_lr_decay_groups() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, max_seq_len=16))
    freeze_layers(model, 2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "tok_emb.weight" in frozen and any(n.startswith("blocks.1.") for n in frozen)
    assert not any(n.startswith("blocks.2.") for n in frozen)
    groups = param_groups(model, 0.1, layer_lr_decay=0.5)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) not in in_groups for n, p in model.named_parameters() if n in frozen)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["blocks.2.attn.qkv.weight"])] == 0.5  # depth 3 of top 4
    assert scale[id(named["final_norm.weight"])] == 1.0
    assert len(param_groups(model, 0.1)) == 2  # no decay: the historical two groups


def test_finetune_options_validated_before_any_process_group() -> None:
    import pytest

    from dist_llm.config.validate import ConfigError, validate

    cfg = _cfg("sft", freeze_layers=9, layer_lr_decay=1.5)
    cfg.task.lora.rank, cfg.task.lora.alpha = 4, 0.0
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=1)
    msg = str(e.value)
    assert "task.freeze_layers=9" in msg and "task.layer_lr_decay=1.5" in msg and "task.lora: rank=4" in msg
