"""Pruning on tiny GPTs trained on the embedded corpus: exact sparsity, really smaller structured
models that match the masked original, masks kept through the fine-tune, checkpoints our loaders read."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dist_llm.cli.main import main as cli_main
from dist_llm.compress import CompressError
from dist_llm.compress.prune import run_prune
from dist_llm.compress.source import load_checkpoint_model
from dist_llm.compress.structured import head_group_cols, prune_structured
from dist_llm.compress.unstructured import apply_masks, magnitude_masks, prunable_weights, sparsity_of
from dist_llm.config.compress_schema import (CompressConfigError, EvalLMConfig, FinetuneConfig, Importance,
                                             PruneConfig, PruneMethod, PruneScope)
from dist_llm.config.schema import ModelConfig
from dist_llm.evaluation import evaluate_lm
from dist_llm.interop.init_from import load_into, resolve_init_from
from dist_llm.models.gpt import GPT

EVAL = EvalLMConfig(batch_size=16, max_batches=8)


@pytest.mark.parametrize("scope", list(PruneScope))
def test_unstructured_reaches_exact_sparsity(compress_runs, scope):
    model = load_checkpoint_model(str(compress_runs["gpt2"])).model
    emb_before = model.tok_emb.weight.detach().clone()
    masks = magnitude_masks(model, 0.5, scope)
    apply_masks(model, masks)
    weights = prunable_weights(model)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    assert zeros == round(0.5 * total)  # exactly the target, counted in the tensors
    if scope == PruneScope.PER_LAYER:
        for name, w in weights.items():
            assert int((w == 0).sum()) == round(0.5 * w.numel()), name
    assert torch.equal(model.tok_emb.weight, emb_before)  # embeddings (and the tied head) untouched
    # the kept weights are the largest: every pruned magnitude <= every kept one (global scope)
    if scope == PruneScope.GLOBAL:
        orig = load_checkpoint_model(str(compress_runs["gpt2"])).model
        mags = [(prunable_weights(orig)[n].detach().abs(), m) for n, m in masks.items()]
        assert max(float(a[~m].max()) for a, m in mags) <= min(float(a[m].min()) for a, m in mags)


def _zero_removed(model: GPT, kept_groups) -> None:
    """Zero the proj columns of removed heads in ``model``: the function the smaller model computes."""
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for g in range(block.attn.n_kv_heads):
                if g not in kept_groups[i]:
                    block.attn.proj.weight[:, head_group_cols(model, g)] = 0


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_structured_heads_shrink_config_and_match_masked_original(compress_runs, preset):
    model = load_checkpoint_model(str(compress_runs[preset])).model
    cfg = model.cfg
    result = prune_structured(model, head_fraction=0.5 if preset == "llama" else 0.25, mlp_fraction=0.0,
                              importance=Importance.L2)
    small = result["model"]
    if preset == "gpt2":  # 4 heads, 25% -> 3
        assert (small.cfg.n_heads, small.cfg.n_kv_heads) == (3, 3)
    else:  # GQA 4 query heads in 2 kv groups: one whole group (2 query heads) goes
        assert (small.cfg.n_heads, small.cfg.n_kv_heads) == (2, 1)
    assert small.cfg.head_dim == cfg.d_model // cfg.n_heads
    hd, d = small.cfg.head_dim, cfg.d_model
    removed_q, removed_kv = cfg.n_heads - small.cfg.n_heads, cfg.n_kv_heads - small.cfg.n_kv_heads
    per_layer = d * hd * (2 * removed_q + 2 * removed_kv) + (hd * (removed_q + 2 * removed_kv) if cfg.bias else 0)
    assert small.num_params() == model.num_params() - cfg.n_layers * per_layer
    assert small.num_params() == GPT(small.cfg).num_params()  # the config alone gives the count
    # removing a head == zeroing its output-projection columns: same logits
    _zero_removed(model, result["kept_head_groups"])
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(small(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_structured_mlp_channels_match_zeroed_channels(compress_runs):
    model = load_checkpoint_model(str(compress_runs["llama"])).model
    result = prune_structured(model, 0.0, 0.25, Importance.L2)
    small = result["model"]
    assert small.cfg.d_ff == model.cfg.d_ff - round(0.25 * model.cfg.d_ff)
    assert small.cfg.n_heads == model.cfg.n_heads and small.cfg.head_dim is None
    for i, block in enumerate(model.blocks):  # zero the fc_out columns of the removed channels
        kept = {tuple(r.tolist()) for r in small.blocks[i].mlp.fc_in.weight.detach()}
        with torch.no_grad():
            for j in range(model.cfg.d_ff):
                if tuple(block.mlp.fc_in.weight[j].tolist()) not in kept:
                    block.mlp.fc_out.weight[:, j] = 0
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(small(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_prune_unstructured_finetune_keeps_masks_and_writes_loadable_checkpoint(compress_runs, tmp_path):
    out = tmp_path / "pruned"
    cfg = PruneConfig(source=str(compress_runs["gpt2"]), out=str(out), sparsity=0.5,
                      finetune=FinetuneConfig(steps=20, lr=1e-3, batch_size=8), eval=EVAL)
    report = run_prune(cfg)
    before, pruned, tuned = report["stages"]
    assert before["prunable_sparsity"] == 0 and pruned["prunable_sparsity"] == 0.5 == tuned["prunable_sparsity"]
    assert tuned["val_loss"] < pruned["val_loss"]  # the fine-tune recovers quality
    assert before["params"] == tuned["params"] and tuned["nonzero_params"] < before["nonzero_params"]
    # the checkpoint: our loaders read it, the zeros and the masks are there
    model_cfg, state, _ = resolve_init_from(ModelConfig(init_from=str(out)))
    model = GPT(model_cfg)
    load_into(model, state, str(out))
    masks = load_file(str(out / "masks.safetensors"))
    for name, w in prunable_weights(model).items():
        assert bool((w[masks[name] == 0] == 0).all()), name  # every masked weight still exactly zero
    assert sparsity_of(model)["sparsity"] == 0.5
    loss = evaluate_lm(model, report["val_dir"], 32, EVAL.batch_size, EVAL.max_batches)["loss"]
    assert loss == pytest.approx(tuned["val_loss"], rel=1e-6)
    saved = json.loads((out / "compress_report.json").read_text())
    assert saved["stages"][-1]["safetensors_bytes_on_disk"] == (out / "model.safetensors").stat().st_size


def test_cli_structured_taylor_with_finetune(compress_runs, tmp_path, capsys):
    out = tmp_path / "small"
    rc = cli_main(["prune", str(compress_runs["llama"]), "--out", str(out), "--method", "structured",
                   "--heads", "0.5", "--mlp", "0.25", "--importance", "taylor", "--finetune-steps", "10",
                   "--eval-batches", "4", "--eval-batch-size", "16"])
    printed = capsys.readouterr().out
    assert rc == 0 and "pruned+finetune(10)" in printed
    src = load_checkpoint_model(str(out))
    assert (src.cfg.n_heads, src.cfg.n_kv_heads, src.cfg.head_dim) == (2, 1, 16)
    report = json.loads((out / "compress_report.json").read_text())
    assert report["stages"][-1]["params"] == src.model.num_params() < report["stages"][0]["params"]


def test_bad_input_is_named(compress_runs, tmp_path):
    with pytest.raises(CompressConfigError, match="--sparsity"):
        run_prune(PruneConfig(source=str(compress_runs["gpt2"]), out=str(tmp_path / "x"), sparsity=1.5))
    with pytest.raises(CompressError, match="--heads=0.1 removes no heads"):
        run_prune(PruneConfig(source=str(compress_runs["gpt2"]), out=str(tmp_path / "x"),
                              method=PruneMethod.STRUCTURED, head_fraction=0.1, eval=EVAL))
    with pytest.raises(CompressError, match="neither config.json"):
        run_prune(PruneConfig(source=str(tmp_path), out=str(tmp_path / "x"), eval=EVAL))


def test_head_pruned_llama_exports_to_transformers_with_same_logits(compress_runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    from dist_llm.interop.export import export_hf

    out = tmp_path / "small"
    run_prune(PruneConfig(source=str(compress_runs["llama"]), out=str(out), method=PruneMethod.STRUCTURED,
                          head_fraction=0.5, mlp_fraction=0.25, eval=EvalLMConfig(batch_size=16, max_batches=2)))
    ours = load_checkpoint_model(str(out)).model
    export_hf(str(out), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert (hf.config.num_attention_heads, hf.config.num_key_value_heads, hf.config.head_dim) == (2, 1, 16)
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4


def test_head_pruned_gpt2_export_is_refused_with_reason(compress_runs, tmp_path):
    pytest.importorskip("transformers")
    from dist_llm.interop import InteropError
    from dist_llm.interop.export import export_hf

    out = tmp_path / "small"
    run_prune(PruneConfig(source=str(compress_runs["gpt2"]), out=str(out), method=PruneMethod.STRUCTURED,
                          head_fraction=0.25, eval=EvalLMConfig(batch_size=16, max_batches=2)))
    with pytest.raises(InteropError, match="head-pruned model cannot be exported as GPT-2"):
        export_hf(str(out), str(tmp_path / "hf"))


def test_hugging_face_source_with_data_flags(tmp_path, stdlib_cache):
    pytest.importorskip("transformers")
    from interop_fixtures import hf_llama

    hf_llama(vocab=258).save_pretrained(tmp_path / "hf")
    ev = EvalLMConfig(val_dir=str(stdlib_cache / "val"), batch_size=8, max_batches=2)
    with pytest.raises(CompressError, match="pass --val-data"):
        run_prune(PruneConfig(source=str(tmp_path / "hf"), out=str(tmp_path / "p"), eval=EvalLMConfig()))
    report = run_prune(PruneConfig(source=str(tmp_path / "hf"), out=str(tmp_path / "p"), method=PruneMethod.STRUCTURED,
                                   head_fraction=0.5, eval=ev))
    assert report["seq_len"] == 32  # the shards' own, no run config to say otherwise
    assert load_checkpoint_model(str(tmp_path / "p")).cfg.n_kv_heads == 1
