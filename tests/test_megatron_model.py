"""Megatron engine, fast part: the plain <-> Megatron state-dict adapter, logits parity of the
two models built from the same weights, the CPU compatibility layer's guards, and layout
validation. Megatron itself is imported only in subprocesses: its CPU layer is process-wide."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dist_llm.config.schema import JobConfig, ModelConfig, ParallelConfig, TrainConfig
from dist_llm.config.validate import ConfigError, validate
from dist_llm.models.gpt import GPT
from dist_llm.parallel.megatron import model as mm

from helpers import REPO

PRESETS = ["gpt2", "llama"]


def _cfg(preset: str) -> ModelConfig:
    return ModelConfig(preset=preset, n_layers=2, n_heads=4, d_model=64, max_seq_len=64, vocab_size=320)


def _python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout, whatever is installed
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


@pytest.mark.parametrize("preset", PRESETS)
def test_adapter_roundtrip_and_layout(preset):
    torch.manual_seed(0)
    plain = GPT(_cfg(preset)).state_dict()
    meg = mm.plain_to_megatron(plain, _cfg(preset))
    back = mm.megatron_to_plain(meg, _cfg(preset))
    assert set(back) == set(plain)
    for k, v in plain.items():
        assert torch.equal(back[k], v), k
    # Megatron's fused QKV interleaves per head: rows of head h are [q_h; k_h; v_h].
    hd = 64 // 4
    qkv, mq = plain["blocks.0.attn.qkv.weight"], meg["decoder.layers.0.self_attention.linear_qkv.weight"]
    for h in range(4):
        for j in range(3):  # q, k, v
            assert torch.equal(mq[(3 * h + j) * hd:(3 * h + j + 1) * hd], qkv[j * 64 + h * hd:j * 64 + (h + 1) * hd])
    if preset == "llama":  # SwiGLU: linear_fc1 = [gate; up]
        fc1 = meg["decoder.layers.1.mlp.linear_fc1.weight"]
        assert torch.equal(fc1[: fc1.shape[0] // 2], plain["blocks.1.mlp.fc_gate.weight"])
    else:
        assert "output_layer.weight" not in meg  # tied to the embedding


@pytest.mark.parametrize("preset", PRESETS)
def test_tp_slice_merge_roundtrip(preset):
    torch.manual_seed(0)
    meg = mm.plain_to_megatron(GPT(_cfg(preset)).state_dict(), _cfg(preset))
    gated = preset == "llama"
    for name, full in meg.items():
        pd = 1 if "linear_proj.weight" in name or "linear_fc2.weight" in name else (
            0 if any(s in name for s in ("linear_qkv", "linear_fc1", "word_embeddings", "output_layer")) else None)
        parts = [mm.tp_slice(name, full, pd, r, 2, gated) for r in range(2)]
        assert torch.equal(mm.tp_merge(name, parts, pd, gated), full), name
    if gated:  # each TP rank holds [gate_r; up_r], so silu(gate_r) * up_r stays local
        full = meg["decoder.layers.0.mlp.linear_fc1.weight"]
        gate, up = full.chunk(2)
        r1 = mm.tp_slice("decoder.layers.0.mlp.linear_fc1.weight", full, 0, 1, 2, True)
        assert torch.equal(r1, torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))


def test_megatron_logits_equal_plain_and_cpu_layer_guards():
    out = _python("""
        import json, os, torch, torch.distributed as dist
        import dist_llm.parallel.megatron as pkg
        # 1. the CPU layer refuses to load where CUDA is available
        real = torch.cuda.is_available
        torch.cuda.is_available = lambda: True
        try:
            import dist_llm.parallel.megatron.cpu_compat
            refused = False
        except ImportError:
            refused = True
        torch.cuda.is_available = real
        ps = pkg.import_parallel_state()
        from dist_llm.parallel.megatron import cpu_compat
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        from dist_llm.config.schema import ModelConfig
        from dist_llm.models.gpt import GPT
        from dist_llm.parallel.megatron import model as mm
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        ps.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(1)
        res = {"refused": refused, "installed": cpu_compat.installed()}
        for preset in ("gpt2", "llama"):
            cfg = ModelConfig(preset=preset, n_layers=2, n_heads=4, d_model=64, max_seq_len=64, vocab_size=320)
            torch.manual_seed(0)
            plain = GPT(cfg).eval()
            chunk = mm.build_chunks(cfg, mm.transformer_config(cfg))[0].eval()
            full = mm.plain_to_megatron(plain.state_dict(), cfg)
            local = mm.local_params(chunk)
            res[preset + "_names_match"] = sorted(local) == sorted(full)
            with torch.no_grad():
                for k, p in local.items():
                    p.copy_(full[k])
                ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(3))
                pos = torch.arange(32).unsqueeze(0).expand(2, -1)
                mask = torch.triu(torch.ones(1, 1, 32, 32, dtype=torch.bool), 1)
                a, b = plain(ids), chunk(ids, pos, mask)
                la = plain(ids[:, :-1], ids[:, 1:])
                lb = chunk(ids[:, :-1], pos[:, :-1], mask[..., :-1, :-1], labels=ids[:, 1:]).mean()
            res[preset + "_logits"] = (a - b).abs().max().item()
            res[preset + "_loss"] = abs(la.item() - lb.item())
            back = mm.megatron_to_plain({k: p.detach() for k, p in local.items()}, cfg)
            res[preset + "_back"] = all(torch.equal(back[k], v) for k, v in plain.state_dict().items())
        saved = cpu_compat._MODE
        try:  # installing after megatron was imported must fail loudly
            cpu_compat._MODE = None
            cpu_compat.install()
            res["late_install_refused"] = False
        except RuntimeError:
            res["late_install_refused"] = True
        cpu_compat._MODE = saved
        print("RESULT" + json.dumps(res))
    """)
    res = json.loads(out.stdout.split("RESULT", 1)[1])
    print({k: v for k, v in res.items() if isinstance(v, float)})
    assert res["refused"] and res["installed"] and res["late_install_refused"]
    for preset in PRESETS:
        assert res[preset + "_names_match"] and res[preset + "_back"]
        assert res[preset + "_logits"] < 1e-5, res
        assert res[preset + "_loss"] < 1e-5, res


def _job(world: int, **par) -> JobConfig:
    cfg = JobConfig(model=ModelConfig(n_layers=4, n_heads=4, d_model=64, vocab_size=320),
                    parallel=ParallelConfig(engine="megatron", **{"zero_stage": 1, **par}),
                    train=TrainConfig(micro_batch_size=2, global_batch_size=8))
    cfg.data.build_embedded = True
    cfg.data.lanes = 2
    return cfg


@pytest.mark.parametrize("world,par,needle", [
    (2, dict(tp=3), "not divisible by parallel.tp=3"),  # heads % tp (and world % tp)
    (4, dict(tp=8), "model.n_heads=4 is not divisible by parallel.tp=8"),
    (2, dict(pp=2, vpp=4), "model.n_layers=4 is not divisible by parallel.pp=2 x parallel.vpp=4"),
    (3, dict(pp=2), "world size 3 is not divisible by parallel.tp=1 x parallel.pp=2"),
    (4, dict(pp=2, vpp=2), "micro-batches per step"),  # global batch 12 below: 3 micro-batches
    (2, dict(sp=True), "parallel.sp=true needs parallel.tp >= 2"),
    (2, dict(vpp=2), "needs parallel.pp >= 2"),
    (2, dict(pp=2, zero_stage=2), "zero_stage=2 with parallel.pp=2"),
    (2, dict(tp=2, zero_stage=3), "zero_stage=3 with parallel.engine=megatron"),
    (2, dict(pp=2, precision="fp16"), "the megatron engine has no loss scaler"),
    (2, dict(tp=2, precision="fp16"), "the megatron engine has no loss scaler"),
])
def test_invalid_layouts_fail_at_validation(world, par, needle):
    cfg = _job(world, **par)
    if needle == "micro-batches per step":
        cfg.train.global_batch_size = 12  # dp=2, micro 2 -> 3 micro-batches: not a multiple of pp=2
        cfg.data.lanes = 2
    with pytest.raises(ConfigError) as e:
        validate(cfg, world)
    assert needle in str(e.value), str(e.value)


def test_valid_megatron_layouts_pass():
    for world, par in [(2, dict(tp=2)), (2, dict(tp=2, sp=True)), (2, dict(pp=2)), (2, dict(pp=2, vpp=2)),
                       (4, dict(tp=2, pp=2)), (4, dict(tp=2, zero_stage=2)), (4, dict(pp=2)),
                       (2, dict(pp=2, precision="bf16")), (4, dict(tp=2, pp=2, vpp=2, precision="bf16"))]:
        validate(_job(world, **par), world)
    cfg = _job(2, tp=2)
    cfg.parallel.engine = "deepspeed"
    with pytest.raises(ConfigError, match="parallel.engine=megatron"):
        validate(cfg, 2)
