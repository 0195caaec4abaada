"""`dist-llm export --format hf` for BERT and ViT checkpoints, and `model.init_from` of HF BERT/ViT
directories, against transformers' own Auto classes (tiny random models, nothing downloads).

Tolerance 1e-4 max abs, as in test_interop_encoders.py: the same fp32 maths in a different kernel
order (fused QKV vs three projections) differs by float rounding only; a wrong mapping is O(1)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))

from dist_llm.checkpoint.manager import CheckpointManager  # noqa: E402
from dist_llm.cli.main import main as cli_main  # noqa: E402
from dist_llm.config.schema import JobConfig, ModelConfig  # noqa: E402
from dist_llm.config.store import config_to_dict  # noqa: E402
from dist_llm.interop import InteropError  # noqa: E402
from dist_llm.interop.init_from import load_into, resolve_init_from  # noqa: E402
from dist_llm.models import build_model  # noqa: E402
from interop_fixtures import TEXT, train_hf_tokenizer  # noqa: E402
from compress_fixtures import SingleRank, WeightsEngine  # noqa: E402

TOL = 1e-4
BERT = ModelConfig(preset="bert", n_layers=2, n_heads=4, d_model=32, d_ff=64, max_seq_len=40, vocab_size=320,
                   init_std=0.2, norm_eps=1e-12)
VIT = ModelConfig(preset="vit", n_layers=2, n_heads=4, d_model=32, d_ff=64, image_size=8, patch_size=2,
                  num_channels=1, num_classes=10, init_std=0.2, norm_eps=1e-12)


def _checkpoint(tmp_path, cfg: ModelConfig):
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = CheckpointManager(tmp_path / f"run_{cfg.preset}", SingleRank(), keep_last=2).save(
        5, WeightsEngine(model), {"step": 5}, {}, config_to_dict(JobConfig(model=cfg)))
    return model, path


def _bert_inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 300, (3, 16), generator=g)
    types = torch.zeros_like(ids)
    types[:, 8:] = 1
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    return ids, types, mask


def _bert_max_diff(ours, hf) -> float:
    ids, types, mask = _bert_inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        out = ours.eval()(ids, types, mask)
    return max((out.mlm_logits - ref.prediction_logits).abs().max().item(),
               (out.nsp_logits - ref.seq_relationship_logits).abs().max().item())


def _vit_max_diff(ours, hf) -> float:
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return (ours.eval()(x) - hf(pixel_values=x).logits).abs().max().item()


def test_bert_export_loads_in_transformers_with_equal_logits_and_tokenizer(tmp_path):
    ours, ckpt = _checkpoint(tmp_path, BERT)
    bpe = train_hf_tokenizer(tmp_path / "bpe")
    out = tmp_path / "bert_hf"
    assert cli_main(["export", str(ckpt), "--format", "hf", "--out", str(out), "--tokenizer", str(bpe)]) == 0
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "generation_config.json").exists()  # an encoder does not generate
    hf = transformers.AutoModelForPreTraining.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "BertForPreTraining"
    assert _bert_max_diff(ours, hf) < TOL
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    from dist_llm.interop.tokenizer import tokenizer_from_hf_dir

    assert auto(TEXT, add_special_tokens=False)["input_ids"] == tokenizer_from_hf_dir(bpe).encode(TEXT)
    # and back: model.init_from=<the export> rebuilds the same model
    cfg, state, tok = resolve_init_from(ModelConfig(init_from=str(out)))
    assert cfg.preset == "bert" and cfg.n_layers == 2 and tok is not None and tok.vocab_size == 300
    back = build_model(cfg)
    load_into(back, state, str(out))
    assert _bert_max_diff(back, hf) < TOL


def test_vit_export_loads_in_transformers_with_equal_logits(tmp_path):
    ours, ckpt = _checkpoint(tmp_path, VIT)
    out = tmp_path / "vit_hf"
    assert cli_main(["export", str(ckpt), "--format", "hf", "--out", str(out)]) == 0
    assert not (out / "tokenizer.json").exists()  # images: no tokenizer
    hf = transformers.AutoModelForImageClassification.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "ViTForImageClassification" and hf.config.num_labels == 10
    assert _vit_max_diff(ours, hf) < TOL
    # exporting twice gives the same bytes
    again = tmp_path / "again"
    assert cli_main(["export", str(ckpt), "--format", "hf", "--out", str(again)]) == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_init_from_hf_encoder_dirs(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "bert":
        hf = transformers.BertForPreTraining(transformers.BertConfig(
            vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    else:
        hf = transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=8, patch_size=2, num_channels=1, num_labels=10, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)).eval()
    hf.save_pretrained(tmp_path / kind)
    cfg, state, _ = resolve_init_from(ModelConfig(init_from=str(tmp_path / kind)))
    assert cfg.preset == kind and cfg.d_model == 32
    ours = build_model(cfg)
    load_into(ours, state, str(tmp_path / kind))
    diff = _bert_max_diff(ours, hf) if kind == "bert" else _vit_max_diff(ours, hf)
    assert diff < TOL


def test_init_from_base_model_fills_heads_and_conflicts_are_named(tmp_path):
    base = transformers.BertModel(transformers.BertConfig(
        vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    base.save_pretrained(tmp_path / "base")
    cfg, state, _ = resolve_init_from(ModelConfig(init_from=str(tmp_path / "base")))
    ours = build_model(cfg)
    load_into(ours, state, "base")  # strict: the fresh heads fill the gaps
    assert torch.equal(ours.state_dict()["tok_emb.weight"], base.state_dict()["embeddings.word_embeddings.weight"])
    with pytest.raises(InteropError, match=r"model.n_layers=3 conflicts with .*config.json"):
        resolve_init_from(ModelConfig(init_from=str(tmp_path / "base"), n_layers=3))
    cfg_json = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**cfg_json, "hidden_act": "relu"}))
    with pytest.raises(InteropError, match="hidden_act"):
        resolve_init_from(ModelConfig(init_from=str(tmp_path / "base")))
