"""MLM masking (deterministic from (seed, step, sample)) and BERT/image batch decoding on real
shards written by `dist-llm prepare`."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_llm.config.store import compose_prepare
from dist_llm.data import read_manifest
from dist_llm.data.batches import decode_bert_batch, decode_image_batch, shift_image
from dist_llm.data.masking import IGNORE_INDEX, mask_batch, mask_tokens
from dist_llm.prepare import run_prepare
from prepare_synthetic import planted_corpus, write_jsonl
from dist_llm.data.shards import IMAGES_FORMAT, PAIRS_FORMAT, read_records

SPECIALS = {"pad": 0, "bos": 1, "eos": 2, "mask": 3, "cls": 4, "sep": 5}
VOCAB = 200


def _sample(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB, (n,), generator=g)
    ids[0], ids[n // 2], ids[-20] = 4, 5, 5
    ids[-19:] = 0  # padding
    return ids


def test_mask_rate_proportions_and_specials():
    rows = torch.stack([_sample(seed=i) for i in range(400)])
    inp, lab = mask_batch(rows, SPECIALS.values(), 3, VOCAB, seed=7, step=3, sample_indices=range(400))
    special = torch.isin(rows, torch.tensor(list(SPECIALS.values())))
    chosen = lab != IGNORE_INDEX
    assert not (chosen & special).any() and torch.equal(inp[special], rows[special])  # specials untouched
    assert torch.equal(lab[chosen], rows[chosen])  # labels are the originals
    rate = chosen.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.005, rate  # round(0.15 * n) per sample
    n = chosen.sum().item()
    masked = (inp[chosen] == 3).sum().item() / n
    kept = (inp[chosen] == rows[chosen]).sum().item() / n
    random = 1 - masked - kept
    # ~8.6k chosen positions: 3 sigma of a 10% share is ~1%; random draws can hit the original (1/194)
    assert abs(masked - 0.8) < 0.015 and abs(kept - 0.1) < 0.015 and abs(random - 0.1) < 0.015, (masked, kept)
    replaced = inp[chosen & (inp != rows) & (inp != 3)]
    assert replaced.numel() and not torch.isin(replaced, torch.tensor(list(SPECIALS.values()))).any()


def test_mask_deterministic_from_triple():
    ids = _sample()
    a = mask_tokens(ids, SPECIALS.values(), 3, VOCAB, seed=1, step=10, sample_index=5)
    b = mask_tokens(ids.clone(), SPECIALS.values(), 3, VOCAB, seed=1, step=10, sample_index=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in ({"seed": 1, "step": 11, "sample_index": 5}, {"seed": 1, "step": 10, "sample_index": 6},
                  {"seed": 2, "step": 10, "sample_index": 5}):
        c = mask_tokens(ids, SPECIALS.values(), 3, VOCAB, **other)
        assert not torch.equal(a[1], c[1]), other
    # batch position does not matter, only the sample's own index (resume / other dp sizes)
    rows = torch.stack([_sample(seed=9), ids])
    inp, lab = mask_batch(rows, SPECIALS.values(), 3, VOCAB, seed=1, step=10, sample_indices=[4, 5])
    assert torch.equal(inp[1], a[0]) and torch.equal(lab[1], a[1])


def test_mask_only_specials_row():
    ids = torch.tensor([4, 5, 5, 0, 0])
    inp, lab = mask_tokens(ids, SPECIALS.values(), 3, VOCAB, 0, 0, 0)
    assert torch.equal(inp, ids) and (lab == IGNORE_INDEX).all()


@pytest.fixture(scope="module")
def bert_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    corpus = planted_corpus(30, seed=1, exact=0, near=0, junk=0, words=(60, 120))
    write_jsonl(corpus.docs, root / "in", files=1)
    run_prepare(compose_prepare([
        "input=files", f"input.paths=[{root / 'in'}]", f"output_dir={root / 'out'}", "tokenizer=char",
        "pack=bert", "pack.seq_len=64", "pack.samples_per_shard=200", "split.val_fraction=0", "workers=1"]))
    m = read_manifest(root / "out" / "train", expect=PAIRS_FORMAT)
    recs = [r for s in m["shards"] for r in read_records(root / "out" / "train" / s["file"])]
    return m, recs


def test_decode_bert_batch_from_real_shards(bert_shards):
    m, recs = bert_shards
    sp, batch = m["special_ids"], recs[:8]
    b = decode_bert_batch(batch, sp, m["vocab_size"], seed=3, step=2, sample_indices=range(16, 24))
    assert b["input_ids"].shape == b["token_type_ids"].shape == b["attention_mask"].shape == (8, 64)
    raw = torch.stack([torch.from_numpy(np.load(io.BytesIO(r["tokens.npy"])).astype(np.int64))
                       for r in batch])
    assert torch.equal(b["attention_mask"].bool(), raw != sp["pad"])
    assert (b["input_ids"][:, 0] == sp["cls"]).all()
    assert torch.equal(b["nsp_labels"], torch.tensor([int(r["nsp.cls"]) for r in batch]))
    chosen = b["mlm_labels"] != IGNORE_INDEX
    assert chosen.any() and not (chosen & (b["attention_mask"] == 0)).any()
    assert (b["input_ids"][chosen] == sp["mask"]).any()
    again = decode_bert_batch(batch, sp, m["vocab_size"], seed=3, step=2, sample_indices=range(16, 24))
    assert all(torch.equal(b[k], again[k]) for k in b)
    plain = decode_bert_batch(batch, sp, m["vocab_size"], 3, 2, range(8), mask=False)
    assert torch.equal(plain["input_ids"], raw) and (plain["mlm_labels"] == IGNORE_INDEX).all()


def test_decode_bert_batch_needs_mask_token(bert_shards):
    m, recs = bert_shards
    with pytest.raises(ValueError, match="'mask'"):
        decode_bert_batch(recs[:2], {"pad": 0}, m["vocab_size"], 0, 0, [0, 1])


@pytest.fixture(scope="module")
def digit_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    run_prepare(compose_prepare([f"output_dir={out}", "input=digits", "pack=image", "dedup=none",
                                 "split.val_fraction=0.1", "pack.samples_per_shard=500", "workers=1"]))
    m = read_manifest(out / "train", expect=IMAGES_FORMAT)
    return read_records(Path(out) / "train" / m["shards"][0]["file"])[:64]


def test_decode_image_batch_and_shift_augment(digit_records):
    b = decode_image_batch(digit_records, seed=0, step=0, sample_indices=range(64))
    assert b["pixel_values"].shape == (64, 1, 8, 8) and b["pixel_values"].dtype == torch.float32
    assert 0.0 <= b["pixel_values"].min() and b["pixel_values"].max() <= 1.0
    assert b["labels"].min() >= 0 and b["labels"].max() <= 9
    a1 = decode_image_batch(digit_records, 0, 5, range(64), augment=True)
    a2 = decode_image_batch(digit_records, 0, 5, range(64), augment=True)
    a3 = decode_image_batch(digit_records, 0, 6, range(64), augment=True)
    assert torch.equal(a1["pixel_values"], a2["pixel_values"])
    assert not torch.equal(a1["pixel_values"], a3["pixel_values"])
    # each augmented image is its original shifted by at most one pixel
    for x, y in zip(b["pixel_values"], a1["pixel_values"]):
        assert any(torch.equal(shift_image(x, dy, dx), y) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def test_shift_image():
    img = torch.arange(9.0).view(1, 3, 3)
    assert torch.equal(shift_image(img, 1, 0)[0], torch.tensor([[0, 0, 0], [0, 1, 2], [3, 4, 5.0]]))
    assert torch.equal(shift_image(img, 0, -1)[0], torch.tensor([[1, 2, 0], [4, 5, 0], [7, 8, 0.0]]))
