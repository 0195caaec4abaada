"""Sanity: our ViT learns sklearn's digits (8x8, 1 channel, 10 classes) from `dist-llm prepare`
image shards, in one process with plain AdamW. The issue's figure (>= 95%, mean of 3 seeds,
through the real trainer) is measured by bench/quality.py; this guards the model + data path."""
from __future__ import annotations

import time

import pytest
import torch

from dist_llm.config.schema import EncoderArch, EncoderConfig
from dist_llm.config.store import compose_prepare
from dist_llm.data import read_manifest
from dist_llm.data.batches import decode_image_batch
from dist_llm.prepare import run_prepare
from dist_llm.data.shards import IMAGES_FORMAT, read_records
from dist_llm.models import build_encoder


def _split(root, split):
    m = read_manifest(root / split, expect=IMAGES_FORMAT)
    recs = [r for s in m["shards"] for r in read_records(root / split / s["file"])]
    return decode_image_batch(recs, seed=0, step=0, sample_indices=range(len(recs)))


@pytest.mark.slow  # ~20 s: prepare + 20 epochs on one core
def test_vit_digits_reaches_90_percent(tmp_path):
    run_prepare(compose_prepare([f"output_dir={tmp_path}", "input=digits", "pack=image", "dedup=none",
                                 "split.val_fraction=0.2", "pack.samples_per_shard=500", "workers=1"]))
    train, test = _split(tmp_path, "train"), _split(tmp_path, "val")
    assert len(test["labels"]) > 250
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_encoder(EncoderConfig(arch=EncoderArch.vit, d_model=64, n_heads=4, n_layers=2, d_ff=128,
                                            image_size=8, patch_size=2, num_channels=1, num_classes=10))
        epochs, bs, n = 20, 64, len(train["labels"])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * -(-n // bs), pct_start=0.1)
        g, t0 = torch.Generator().manual_seed(0), time.time()
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                loss = torch.nn.functional.cross_entropy(model(train["pixel_values"][idx]), train["labels"][idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        elapsed = time.time() - t0
        model.eval()
        with torch.no_grad():
            acc = (model(test["pixel_values"]).argmax(-1) == test["labels"]).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    print(f"vit_digits_accuracy {acc:.4f} in {elapsed:.1f}s")
    assert acc >= 0.90, acc
    assert elapsed < 60, elapsed
