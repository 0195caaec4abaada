"""BERT/ViT plain-module behaviour not covered by the HF parity tests: config validation,
loss helpers, tied MLM decoder, input checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from dist_llm.config.schema import EncoderArch, EncoderConfig
from dist_llm.models import Bert, ViT, build_encoder
from dist_llm.models.bert import IGNORE_INDEX, mlm_accuracy, mlm_loss, nsp_accuracy, nsp_loss


def test_build_encoder_from_structured_config():
    c = OmegaConf.structured(EncoderConfig)
    c.arch = "vit"
    assert isinstance(build_encoder(OmegaConf.to_object(c)), ViT)
    assert isinstance(build_encoder(EncoderConfig()), Bert)


@pytest.mark.parametrize("kw,field", [({"d_model": 30, "n_heads": 4}, "encoder.d_model"),
                                      ({"arch": EncoderArch.vit, "image_size": 9}, "encoder.image_size"),
                                      ({"pad_id": 300}, "encoder.pad_id")])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        EncoderConfig(**kw).validate()


def test_mlm_loss_only_on_labelled_positions():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 1], labels[1, 3] = 4, 7
    want = F.cross_entropy(torch.stack([logits[0, 1], logits[1, 3]]), torch.tensor([4, 7]))
    assert torch.allclose(mlm_loss(logits, labels), want)
    mlm_loss(logits, labels).backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert touched.sum() == 2 and touched[0, 1] and touched[1, 3]
    none = mlm_loss(logits, torch.full((2, 5), IGNORE_INDEX))
    assert none.item() == 0.0 and none.requires_grad
    correct, total = mlm_accuracy(logits, labels)
    assert total == 2 and 0 <= correct <= 2


def test_nsp_helpers():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    assert nsp_accuracy(logits, labels) == (2, 3)
    assert torch.allclose(nsp_loss(logits, labels), F.cross_entropy(logits, labels))


def test_mlm_decoder_is_tied_to_word_embeddings():
    m = Bert(EncoderConfig(vocab_size=50, d_model=16, n_heads=2))
    assert not any(p is not m.tok_emb.weight and p.shape == m.tok_emb.weight.shape for p in m.parameters())
    ids = torch.randint(0, 50, (2, 8))
    out = m(ids)
    # a token that never appears in the input still gets a gradient through the decoder
    unused = sorted(set(range(50)) - set(ids.flatten().tolist()))[0]
    out.mlm_logits[..., unused].sum().backward()
    assert m.tok_emb.weight.grad[unused].abs().sum() > 0


def test_input_shape_errors_name_the_config_field():
    with pytest.raises(ValueError, match="encoder.max_seq_len"):
        Bert(EncoderConfig(max_seq_len=8))(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="encoder.num_channels"):
        ViT(EncoderConfig(arch=EncoderArch.vit))(torch.zeros(1, 3, 8, 8))


def test_all_padding_row_stays_finite():
    m = Bert(EncoderConfig(vocab_size=50, d_model=16, n_heads=2)).eval()
    ids = torch.randint(6, 50, (2, 8))
    mask = torch.ones_like(ids)
    mask[1] = 0
    with torch.no_grad():
        out = m(ids, attention_mask=mask)
        alone = m(ids[:1], attention_mask=mask[:1])
    assert torch.isfinite(out.mlm_logits).all() and torch.isfinite(out.nsp_logits).all()
    assert torch.allclose(out.mlm_logits[0], alone.mlm_logits[0], atol=1e-6)
