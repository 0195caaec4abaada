"""Tasks (dist_llm/train/tasks): registry, validation, and the record path of the loader.

In-process and fast: real pack=bert / pack=image shards written by the prepare pipeline, the
real lane loader and the real BERT/ViT models. The multi-rank runs are in test_tasks_e2e.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_llm.config.store import compose
from dist_llm.config.validate import ConfigError, validate
from dist_llm.data.loader import TrainLoader, ValLoader
from dist_llm.data.shard_scan import read_checked_records
from dist_llm.data.shards import shard_path
from dist_llm.prepare.embedded import build_embedded_set
from dist_llm.train.tasks import build_task, registered_kinds


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bert") / "stdlib_bert"
    build_embedded_set(out, "stdlib_bert", 128, max_bytes=150_000, samples_per_shard=64)
    return out


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "digits"
    build_embedded_set(out, "digits", 0)
    return out


def _cfg(*overrides: str):
    return compose(list(overrides))


def test_registry_builds_each_kind_and_names_the_missing_ones():
    assert {"pretrain", "mlm_nsp", "classify"} <= set(registered_kinds())
    assert build_task(_cfg()).kind == "pretrain"
    assert build_task(_cfg("task=mlm_nsp", "model=bert_tiny")).kind == "mlm_nsp"
    assert build_task(_cfg("task=classify", "model=vit_digits")).kind == "classify"
    cfg = _cfg("task.kind=distill")
    if "distill" not in registered_kinds():
        with pytest.raises(ValueError, match="task.kind=distill has no implementation"):
            build_task(cfg)


@pytest.mark.parametrize("overrides,needle", [
    (["task=classify", "model=vit_digits", "parallel=tp2", "launcher.nproc=2"], "parallel.engine=deepspeed"),
    (["task=mlm_nsp", "model=bert_tiny", "parallel=pp2", "launcher.nproc=2"], "set parallel.pp=1"),
    (["model=bert_tiny"], "task=pretrain (causal LM) cannot train the encoder model.preset=bert"),
    (["task=mlm_nsp"], "task=mlm_nsp needs a BERT model"),
    (["task=mlm_nsp", "model=bert_tiny", "task.mlm_nsp.mlm_prob=1.5"], "task.mlm_nsp.mlm_prob=1.5"),
])
def test_task_layout_combinations_fail_at_validation(overrides, needle):
    cfg = _cfg(*overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, 2 if "launcher.nproc=2" in overrides else 1)
    assert needle in str(e.value)


def test_megatron_still_validates_pretrain():
    validate(_cfg("parallel=tp2", "launcher.nproc=2"), 2)
    validate(_cfg("task=mlm_nsp", "model=bert_tiny", "parallel=tp2", "launcher.nproc=2"), 2)  # Megatron BERT


def _bert_task(bert_dir: Path):
    task = build_task(_cfg("task=mlm_nsp", "model=bert_tiny", "train.seq_len=128"))
    task.setup_data(json.loads((bert_dir / "train" / "manifest.json").read_text()))
    return task


def _loader(bert_dir, task, dp_rank, dp, micro, accum):
    return TrainLoader([(str(bert_dir / "train"), 1.0)], 128, 2, dp_rank, dp, micro, accum, 7,
                       fmt=task.sample_format, decode=task.decode_batch)


def test_bert_batches_and_masks_do_not_depend_on_dp_and_resume_exactly(bert_dir):
    task = _bert_task(bert_dir)
    one = _loader(bert_dir, task, 0, 1, 4, 2)  # global batch 8 = 4 x 2 x dp 1
    two = [_loader(bert_dir, task, r, 2, 4, 1) for r in (0, 1)]  # 8 = 4 x 1 x dp 2
    for _ in range(3):
        a = one.next_step()
        b = [l.next_step()[0] for l in two]
        for key in ("input_ids", "mlm_labels", "nsp_labels", "token_type_ids", "attention_mask"):
            torch.testing.assert_close(torch.cat([m[key] for m in a]), torch.cat([m[key] for m in b]),
                                       rtol=0, atol=0)
        assert (a[0]["mlm_labels"] != -100).any()
    state = one.state_dict()
    want = one.next_step()
    again = _loader(bert_dir, task, 0, 1, 4, 2)
    again.load_state_dict(json.loads(json.dumps(state)))
    got = again.next_step()
    for x, y in zip(want, got):
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_val_records_split_across_ranks_equal_one_rank(bert_dir):
    task = _bert_task(bert_dir)
    kw = dict(micro_batch_size=4, num_samples=16, fmt=task.sample_format, decode=task.decode_eval_batch)
    one = ValLoader(str(bert_dir / "val"), 128, 0, 1, **kw).batches()
    two = [ValLoader(str(bert_dir / "val"), 128, r, 2, **kw).batches() for r in (0, 1)]
    flat = lambda bs, k: torch.cat([b[k] for b in bs])  # noqa: E731
    for key in ("input_ids", "mlm_labels"):
        assert torch.equal(flat(one, key), torch.cat([flat(two[0], key), flat(two[1], key)]))


def test_mlm_nsp_loss_and_metrics_match_the_model_helpers(bert_dir):
    from dist_llm.models.bert import mlm_accuracy, mlm_loss, nsp_accuracy, nsp_loss

    task = _bert_task(bert_dir)
    torch.manual_seed(0)
    model = task.build_model(task.cfg)
    batch = _loader(bert_dir, task, 0, 1, 8, 1).next_step()[0]
    loss, m = task.loss(model, batch)
    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    ref = mlm_loss(out.mlm_logits, batch["mlm_labels"]) + nsp_loss(out.nsp_logits, batch["nsp_labels"])
    assert torch.allclose(loss, ref)
    assert tuple(int(x) for x in m["mlm_accuracy"]) == mlm_accuracy(out.mlm_logits, batch["mlm_labels"])
    assert tuple(int(x) for x in m["nsp_accuracy"]) == nsp_accuracy(out.nsp_logits, batch["nsp_labels"])
    loss.backward()
    assert model.nsp.weight.grad is not None and model.tok_emb.weight.grad.abs().sum() > 0


def test_image_task_decodes_checks_shapes_and_scores(digits_dir):
    cfg = _cfg("task=classify", "model=vit_digits", "task.classify.augment=true")
    task = build_task(cfg)
    manifest = json.loads((digits_dir / "train" / "manifest.json").read_text())
    task.setup_data(manifest)
    loader = TrainLoader([(str(digits_dir / "train"), 1.0)], 32, 2, 0, 1, 16, 1, 1234,
                         fmt=task.sample_format, decode=task.decode_batch)
    batch = loader.next_step()[0]
    assert batch["pixel_values"].shape == (16, 1, 8, 8) and batch["labels"].shape == (16,)
    model = task.build_model(cfg)
    loss, m = task.loss(model, batch)
    assert int(m["accuracy"][1]) == 16 and 0 <= int(m["accuracy"][0]) <= 16 and loss.item() > 0
    bad = build_task(_cfg("task=classify", "model=vit_digits", "model.image_size=16"))
    with pytest.raises(ValueError, match="model.image_size"):
        bad.setup_data(manifest)


def test_task_and_data_format_mismatch_is_named(digits_dir, bert_dir):
    task = _bert_task(bert_dir)
    with pytest.raises(ValueError, match="pack"):
        TrainLoader([(str(digits_dir / "train"), 1.0)], 128, 2, 0, 1, 4, 1, 7, fmt=task.sample_format,
                    decode=task.decode_batch)


def test_single_document_split_still_gets_random_next_pairs(tmp_path):
    """A val split of one document draws its random B from the train split (NSP labels not all 0)."""
    from dist_llm.config.prepare_schema import (CleanConfig, DedupConfig, EmbeddedInput, FilterConfig,
                                                PackConfig, PackKind, PrepareConfig, PrepareInputConfig,
                                                SplitConfig, TokenizerKind, TokenizerPrepConfig)
    from dist_llm.prepare.pipeline import run_prepare

    run_prepare(PrepareConfig(
        output_dir=str(tmp_path), workers=1, progress="off",
        input=PrepareInputConfig(embedded=EmbeddedInput.stdlib, embedded_max_bytes=150_000),
        clean=CleanConfig(steps=[]), filter=FilterConfig(enabled=False), dedup=DedupConfig(exact=False, near=False),
        tokenizer=TokenizerPrepConfig(kind=TokenizerKind.char),
        pack=PackConfig(kind=PackKind.bert, seq_len=128, samples_per_shard=64),
        split=SplitConfig(val_fraction=0.0, val_every=1000)))
    m = json.loads((tmp_path / "val" / "manifest.json").read_text())
    assert m["extra"]["documents"] == 1
    labels = [int(r["nsp.cls"]) for sh in m["shards"] if sh["num_samples"]
              for r in read_checked_records(shard_path(tmp_path / "val", sh), m["format"], sh["num_samples"])]
    assert 0.2 < sum(labels) / len(labels) < 0.8
