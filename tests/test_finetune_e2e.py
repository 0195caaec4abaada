"""Fine-tuning through the real CLI: text classify with LoRA on 2 gloo ranks under ZeRO-3 writes
a real (non-empty) adapter beside the checkpoint, and `dist-llm export`-style merging of it gives
a plain model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import metrics, run_cli
from safetensors.torch import load_file

from dist_llm.config.store import compose_prepare
from dist_llm.models.lora import ADAPTER_FILE, load_adapter, merge_lora
from dist_llm.prepare import run_prepare

pytestmark = pytest.mark.slow


def test_classify_lora_zero3_two_ranks(tmp_path: Path) -> None:
    data = tmp_path / "data" / "cls"
    run_prepare(compose_prepare([f"output_dir={data}", "input=stdlib_classify", "pack=classify", "pack.seq_len=64", "pack.samples_per_shard=100",
                                 "tokenizer=byte", "dedup=none", "workers=1", "progress=off", "split.val_every=5"]))
    run_cli(["train", "model=tiny", "model.vocab_size=258", "model.num_classes=6", "task=classify", "data=shards",
             f"data.train.0.path={data / 'train'}", f"data.val={data / 'val'}", "data.lanes=2", "data.num_workers=1",
             "parallel=zero3", "launcher.nproc=2",
             "train.seq_len=64", "train.max_steps=6", "train.micro_batch_size=4", "train.global_batch_size=16",
             "train.eval_every=6", "train.eval_batches=1", "task.lora.rank=4", "logging=none",
             "train.ui.progress_bar=off", "name=lora"], cwd=tmp_path)
    run = tmp_path / "runs" / "lora"
    loss = metrics(run, "train/loss")
    assert sorted(loss) == list(range(1, 7))
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    adapter, spec = load_adapter(ckpt)
    assert spec.rank == 4 and len(adapter) == 2 * 2 * 2 + 2  # qkv+proj x A/B x 2 layers + cls_head w/b
    assert all(t.numel() > 0 for t in adapter.values())
    assert any(k.endswith("lora_B") and t.abs().sum() > 0 for k, t in adapter.items())  # trained, not zero-init
    full = load_file(str(ckpt / "model.safetensors"))
    for k, t in adapter.items():
        torch.testing.assert_close(t, full[k])  # the gathered weights, not a rank's empty partition
    merged = merge_lora(full, adapter, spec)
    assert not any("lora_" in k for k in merged)
    assert (ckpt / ADAPTER_FILE).stat().st_size < (ckpt / "model.safetensors").stat().st_size / 3
