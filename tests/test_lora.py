"""LoRA: only adapters train, the optimizer holds only adapter state, merging gives base +
scale*B@A, and under DeepSpeed ZeRO-3 on 2 ranks the saved adapter holds the real weights
(equal to the 1-rank result)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_llm.config.schema import ModelConfig
from dist_llm.launch.local import spawn_local
from dist_llm.models import GPT
from dist_llm.models.lora import (ADAPTER_CONFIG, ADAPTER_FILE, LoRALinear, LoraSpec, adapter_state_dict,
                                  apply_lora, load_adapter, merge_lora, save_adapter)

WORKER = str(Path(__file__).with_name("lora_worker.py"))


def _gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16))


def _train(model: GPT, steps: int = 5) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 64, (4, 17), generator=g)
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_only_adapters_change_and_optimizer_holds_only_them() -> None:
    model = _gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = LoraSpec(rank=4, alpha=8, target_modules=["*attn.qkv", "*attn.proj"])
    names = apply_lora(model, spec)
    assert names == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"]
    assert set(before) <= set(model.state_dict())  # base keys unchanged: checkpoints/export still load
    opt = _train(model)
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), f"base tensor {k} changed"
    adapters = {k for k in after if k not in before}
    assert all(not torch.equal(after[k], torch.zeros_like(after[k])) for k in adapters if k.endswith("lora_B"))
    state_params = {id(p) for p in opt.state}
    lora_params = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert state_params == lora_params and len(lora_params) == 8


def test_merge_equals_base_plus_scaled_BA_and_same_outputs() -> None:
    model = _gpt()
    spec = LoraSpec(rank=4, alpha=12, target_modules=["*qkv", "*fc_in"])
    apply_lora(model, spec)
    _train(model, 3)
    state = model.state_dict()
    adapter = adapter_state_dict(state, spec)
    merged = merge_lora(state, adapter, spec)
    k = "blocks.1.attn.qkv"
    expect = state[f"{k}.weight"] + (spec.alpha / spec.rank) * state[f"{k}.lora_B"] @ state[f"{k}.lora_A"]
    assert torch.allclose(merged[f"{k}.weight"], expect, atol=1e-6)
    assert not any("lora_" in key for key in merged)
    plain = _gpt(seed=5)
    plain.load_state_dict(merged)  # strict: exactly the base model's keys
    x = torch.randint(0, 64, (2, 16))
    model.eval()
    torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=0)


def test_adapter_files_round_trip_and_empty_refused(tmp_path: Path) -> None:
    model = _gpt()
    spec = LoraSpec(rank=2, alpha=4, target_modules=["*proj"], train_also=["final_norm.*"])
    apply_lora(model, spec)
    assert model.final_norm.weight.requires_grad and not model.tok_emb.weight.requires_grad
    adapter = adapter_state_dict(model.state_dict(), spec)
    save_adapter(tmp_path / "a", adapter, spec)
    tensors, spec2 = load_adapter(tmp_path / "a")
    assert spec2 == spec and set(tensors) == set(adapter) and "final_norm.weight" in tensors
    size = (tmp_path / "a" / ADAPTER_FILE).stat().st_size
    assert size < sum(v.numel() * 4 for v in model.state_dict().values()) / 5  # small, the point of LoRA
    with pytest.raises(ValueError, match="empty LoRA adapter"):
        save_adapter(tmp_path / "b", {"x.lora_A": torch.zeros(0)}, spec)
    with pytest.raises(ValueError, match="match no Linear layer"):
        apply_lora(_gpt(), LoraSpec(target_modules=["*nope"]))
    assert isinstance(model.blocks[0].attn.proj, LoRALinear)


@pytest.mark.slow  # two local mock clusters (1 and 2 ranks); DS_ACCELERATOR=cpu is set for the ranks below
def test_zero3_two_ranks_saves_real_adapter_equal_to_one_rank(tmp_path: Path) -> None:
    env = {"DS_ACCELERATOR": "cpu", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    assert spawn_local(1, [WORKER, str(tmp_path), "3"], extra_env=env) == 0
    assert spawn_local(2, [WORKER, str(tmp_path), "3"], extra_env=env) == 0
    one, two = load_file(str(tmp_path / "adapter-1" / ADAPTER_FILE)), load_file(str(tmp_path / "adapter-2" / ADAPTER_FILE))
    assert set(one) == set(two) and len(one) == 8
    for k in one:
        assert two[k].numel() > 0 and two[k].abs().sum() > 0, f"{k} is empty or zero in the 2-rank adapter"
        torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=0)
    assert json.loads((tmp_path / "adapter-2" / ADAPTER_CONFIG).read_text())["rank"] == 4
    for w in (1, 2):
        st = json.loads((tmp_path / f"stats-{w}.json").read_text())
        assert st["changed_base"] == []
        # ZeRO-3 fp32 partitions across ranks: the adapters (plus alignment padding), not the model
        assert st["adapter_numel"] <= st["optimizer_numel"] <= st["adapter_numel"] + 64 * w, st
        assert st["optimizer_numel"] < st["model_numel"] / 2
