"""BERT and ViT adapters against transformers' own classes (tiny random models, no download).

Tolerance 1e-4 max abs: both sides run the same fp32 maths with different kernel orderings
(fused QKV vs three projections, SDPA vs HF's attention), so differences are float rounding,
orders of magnitude below 1e-4 at these sizes; a wrong mapping gives O(1) differences.
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dist_llm.config.schema import EncoderArch, EncoderConfig  # noqa: E402
from dist_llm.interop._common_enc import HFImportError  # noqa: E402
from dist_llm.interop.bert import load_hf_bert, save_hf_bert  # noqa: E402
from dist_llm.interop.vit import load_hf_vit, save_hf_vit  # noqa: E402
from dist_llm.models import build_encoder  # noqa: E402

TOL = 1e-4


def _hf_bert(**kw):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=40, type_vocab_size=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    return transformers.BertForPreTraining(cfg).eval()


def _hf_vit(**kw):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=1, num_labels=10, hidden_size=32,
                                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    return transformers.ViTForImageClassification(cfg).eval()


def _bert_inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 99, (3, 16), generator=g)
    types = torch.zeros_like(ids)
    types[:, 8:] = 1
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # padded rows: keys beyond the mask must be ignored
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    return ids, types, mask


def _assert_bert_equal(hf, ours):
    ids, types, mask = _bert_inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        out = ours.eval()(ids, types, mask)
    assert (out.mlm_logits - ref.prediction_logits).abs().max() < TOL
    assert (out.nsp_logits - ref.seq_relationship_logits).abs().max() < TOL


def _assert_vit_equal(hf, ours):
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
        out = ours.eval()(x)
    assert (out - ref).abs().max() < TOL


def test_bert_import_matches_hf_logits(tmp_path):
    hf = _hf_bert()
    hf.save_pretrained(tmp_path / "hf")
    ours, missing = load_hf_bert(tmp_path / "hf")
    assert missing == [] and ours.cfg.norm_eps == 1e-12 and ours.cfg.vocab_size == 99
    _assert_bert_equal(hf, ours)


def test_bert_padding_mask_changes_output():
    """The mask is live: unmasking padded keys changes the real tokens' outputs."""
    ours = build_encoder(EncoderConfig(arch=EncoderArch.bert, vocab_size=99, d_model=32)).eval()
    ids, types, mask = _bert_inputs()
    with torch.no_grad():
        a = ours(ids, types, mask).mlm_logits[2, :5]
        b = ours(ids, types, torch.ones_like(mask)).mlm_logits[2, :5]
        c = ours(ids[2:, :5], types[2:, :5]).mlm_logits[0]
    assert (a - b).abs().max() > 1e-3
    assert (a - c).abs().max() < 1e-5  # masked keys = keys that are not there


def test_bert_export_loads_in_transformers(tmp_path):
    torch.manual_seed(3)
    ours = build_encoder(EncoderConfig(arch=EncoderArch.bert, vocab_size=99, d_model=32, n_heads=4,
                                       d_ff=64, max_seq_len=40)).eval()
    save_hf_bert(ours, tmp_path / "out")
    hf, info = transformers.BertForPreTraining.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _assert_bert_equal(hf.eval(), ours)
    # and back: every tensor equal
    back, missing = load_hf_bert(tmp_path / "out")
    assert missing == []
    sd, sd2 = ours.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_bert_roundtrip_through_hf_save(tmp_path):
    """ours -> export -> HF from_pretrained -> HF save_pretrained -> import: equal tensors."""
    torch.manual_seed(4)
    ours = build_encoder(EncoderConfig(arch=EncoderArch.bert, vocab_size=99, d_model=32, max_seq_len=40))
    save_hf_bert(ours, tmp_path / "a")
    transformers.BertForPreTraining.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    back, _ = load_hf_bert(tmp_path / "b")
    sd, sd2 = ours.state_dict(), back.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_bert_base_model_import_reports_missing_heads(tmp_path):
    hf = _hf_bert()
    hf.bert.save_pretrained(tmp_path / "base")  # BertModel: no "bert." prefix, no heads
    ours, missing = load_hf_bert(tmp_path / "base")
    assert "mlm_bias" in missing and "nsp.weight" in missing and "pooler.weight" not in missing
    ids, types, mask = _bert_inputs()
    with torch.no_grad():
        ref = hf.bert(input_ids=ids, token_type_ids=types, attention_mask=mask)
        hidden, pooled = ours.eval().encode(ids, types, mask)
    assert (hidden - ref.last_hidden_state).abs().max() < TOL
    assert (pooled - ref.pooler_output).abs().max() < TOL


@pytest.mark.parametrize("field,value", [("position_embedding_type", "relative_key"), ("hidden_act", "relu")])
def test_bert_unsupported_option_names_field(tmp_path, field, value):
    _hf_bert().save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "config.json"
    cfg = json.loads(f.read_text())
    cfg[field] = value
    f.write_text(json.dumps(cfg))
    with pytest.raises(HFImportError, match=field):
        load_hf_bert(tmp_path / "hf")


def test_wrong_architecture_is_named(tmp_path):
    _hf_vit().save_pretrained(tmp_path / "vit")
    with pytest.raises(HFImportError, match="model_type is 'vit', expected 'bert'"):
        load_hf_bert(tmp_path / "vit")


def test_vit_import_matches_hf_logits(tmp_path):
    hf = _hf_vit()
    hf.save_pretrained(tmp_path / "hf")
    ours, missing = load_hf_vit(tmp_path / "hf")
    assert missing == [] and ours.cfg.num_classes == 10
    _assert_vit_equal(hf, ours)


def test_vit_without_qkv_bias(tmp_path):
    hf = _hf_vit(qkv_bias=False)
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = load_hf_vit(tmp_path / "hf")
    _assert_vit_equal(hf, ours)


def test_vit_export_loads_in_transformers_and_roundtrips(tmp_path):
    torch.manual_seed(5)
    ours = build_encoder(EncoderConfig(arch=EncoderArch.vit, d_model=32, n_heads=4, d_ff=64)).eval()
    save_hf_vit(ours, tmp_path / "out")
    hf, info = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _assert_vit_equal(hf.eval(), ours)
    hf.save_pretrained(tmp_path / "again")
    back, missing = load_hf_vit(tmp_path / "again")
    assert missing == []
    sd, sd2 = ours.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_vit_unsupported_activation_names_field(tmp_path):
    _hf_vit(hidden_act="relu").save_pretrained(tmp_path / "hf")
    with pytest.raises(HFImportError, match="hidden_act='relu'"):
        load_hf_vit(tmp_path / "hf")
