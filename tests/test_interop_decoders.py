"""Hugging Face interop for the decoder presets and the tokenizer, both ways, against real
``transformers`` models built here with random weights (nothing downloads).

Tolerance 1e-4 max abs on logits: both sides are fp32 on CPU with the same weights; the only
differences are summation order (fused vs split projections, SDPA vs eager attention), measured
around 1e-6.
"""
from __future__ import annotations

import json

import pytest
import torch
from interop_fixtures import TEXT, VOCAB, hf_gpt2, hf_llama, train_hf_tokenizer

transformers = pytest.importorskip("transformers")

from dist_llm.config.schema import ModelConfig  # noqa: E402
from dist_llm.data.tokenizer import ByteTokenizer, HFTokenizer  # noqa: E402
from dist_llm.interop import InteropError, adapter_for_model_type  # noqa: E402
from dist_llm.interop import gpt2 as gpt2_adapter  # noqa: E402
from dist_llm.interop import llama as llama_adapter  # noqa: E402
from dist_llm.interop.tokenizer import export_tokenizer, tokenizer_from_hf_dir  # noqa: E402
from dist_llm.models import build_model  # noqa: E402

TOL = 1e-4


def _ids():
    return torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))


def _import(hf_model, adapter):
    cfg = adapter.config_from_hf(hf_model.config.to_dict())
    model = build_model(cfg).eval()
    model.load_state_dict(adapter.state_dict_from_hf(hf_model.state_dict(), cfg))
    return cfg, model


def _check_both_ways(hf_model, adapter):
    cfg, ours = _import(hf_model, adapter)
    ids = _ids()
    with torch.no_grad():
        diff = (ours(ids) - hf_model(ids).logits).abs().max().item()
    assert diff < TOL, diff
    # back: our weights -> HF tensors equal the original ones, and a fresh HF model runs them
    back = adapter.state_dict_to_hf(ours.state_dict(), cfg)
    orig = hf_model.state_dict()
    for k, v in back.items():
        assert torch.equal(v, orig[k]), k
    hf_cfg = transformers.AutoConfig.for_model(**adapter.config_to_hf(cfg))
    fresh = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    missing, unexpected = fresh.load_state_dict(back, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    fresh.tie_weights()
    with torch.no_grad():
        assert (fresh(ids).logits - ours(ids)).abs().max().item() < TOL
    return cfg


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_both_ways(tie):
    cfg = _check_both_ways(hf_gpt2(tie=tie), gpt2_adapter)
    assert cfg.tie_embeddings is tie and cfg.d_ff == 128


def test_llama_gqa_untied_both_ways():
    cfg = _check_both_ways(hf_llama(kv_heads=2), llama_adapter)
    assert cfg.n_kv_heads == 2 and cfg.tie_embeddings is False and cfg.rope_theta == 500.0


def test_llama_mha_tied_both_ways():
    _check_both_ways(hf_llama(kv_heads=4, tie=True), llama_adapter)


def test_unsupported_options_name_the_field():
    d = hf_llama(kv_heads=4).config.to_dict()
    d["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(InteropError, match="rope_scaling"):
        llama_adapter.config_from_hf(d)
    d = hf_llama(kv_heads=4).config.to_dict()
    d["hidden_act"] = "gelu"
    with pytest.raises(InteropError, match="hidden_act"):
        llama_adapter.config_from_hf(d)
    d = hf_llama(kv_heads=4).config.to_dict()
    d["attention_bias"] = True
    with pytest.raises(InteropError, match="attention_bias"):
        llama_adapter.config_from_hf(d)
    d = hf_gpt2().config.to_dict()
    d["activation_function"] = "relu"
    with pytest.raises(InteropError, match="activation_function"):
        gpt2_adapter.config_from_hf(d)
    with pytest.raises(InteropError, match="model_type='bert2'"):
        adapter_for_model_type("bert2")


def test_tokenizer_from_hf_dir_encodes_like_autotokenizer(tmp_path):
    hf_dir = train_hf_tokenizer(tmp_path / "hf_tok")
    ours = tokenizer_from_hf_dir(hf_dir)
    auto = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    ids = ours.encode(TEXT)
    assert len(ids) < len(TEXT.encode())  # merges were used: a real comparison, not bytes
    assert ids == auto(TEXT)["input_ids"] == auto.encode(TEXT, add_special_tokens=False)
    assert ours.eos_id == auto.eos_token_id and ours.pad_id == auto.pad_token_id
    assert ours.special_ids["bos"] == auto.bos_token_id
    assert ours.decode(ids) == TEXT


def test_our_tokenizers_exported_encode_like_ours(tmp_path):
    hf_dir = train_hf_tokenizer(tmp_path / "hf_tok")
    for name, tok in {"hf": HFTokenizer(hf_dir / "tokenizer.json", eos_token="</s>"),
                      "byte": ByteTokenizer()}.items():
        out = tmp_path / f"export_{name}"
        export_tokenizer(tok, out, model_max_length=64)
        auto = transformers.AutoTokenizer.from_pretrained(str(out))
        assert auto(TEXT)["input_ids"] == tok.encode(TEXT), name
        assert auto.eos_token_id == tok.eos_id, name
        assert auto.decode(tok.encode(TEXT)) == TEXT, name
        assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 64


def test_slow_tokenizer_dir_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(InteropError, match="tokenizer.json"):
        tokenizer_from_hf_dir(tmp_path)


def test_config_round_trip_preserves_architecture():
    cfg = ModelConfig(preset="llama", n_layers=3, n_heads=4, d_model=32, max_seq_len=16, vocab_size=50,
                      rope_theta=1234.0, norm_eps=1e-6)
    back = llama_adapter.config_from_hf(llama_adapter.config_to_hf(cfg))
    for f in ("preset", "n_layers", "n_heads", "d_model", "max_seq_len", "vocab_size", "rope_theta", "norm_eps"):
        assert getattr(back, f) == getattr(cfg, f), f
