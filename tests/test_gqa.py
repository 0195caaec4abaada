"""Grouped-query attention (``model.n_kv_heads``): the plain model against a hand-written
reference that repeats key/value heads, the FLOP count, validation, the Megatron adapter's
per-group layout, and logits parity with Megatron-core at tp=1 and tp=2 (gloo ranks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from dist_llm.config.schema import JobConfig, ModelConfig, ParallelConfig, TrainConfig
from dist_llm.config.validate import ConfigError, validate
from dist_llm.models import GPT, flops_per_token, resolve_model_config
from dist_llm.models.gpt import apply_rope
from dist_llm.parallel.megatron import model as mm

from helpers import REPO

PRESETS = ["gpt2", "llama"]


def gqa_cfg(preset: str, n_kv_heads=2, **kw) -> ModelConfig:
    base = dict(preset=preset, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, d_model=64, max_seq_len=64,
                vocab_size=320)
    return ModelConfig(**{**base, **kw})


def reference_attention(attn, x: torch.Tensor, rope) -> torch.Tensor:
    """Attention written out by hand from the fused weight: split rows [q; k; v], repeat each
    key/value head for its n_heads/n_kv_heads query heads, softmax(q k^T / sqrt(hd)) v."""
    b, t, _ = x.shape
    hd, nh, nkv = attn.head_dim, attn.n_heads, attn.n_kv_heads
    w, bias = attn.qkv.weight, attn.qkv.bias
    out = x @ w.T + (bias if bias is not None else 0)
    q = out[..., : nh * hd].view(b, t, nh, hd).transpose(1, 2)
    k = out[..., nh * hd: (nh + nkv) * hd].view(b, t, nkv, hd).transpose(1, 2)
    v = out[..., (nh + nkv) * hd:].view(b, t, nkv, hd).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    group = nh // nkv
    k = torch.stack([k[:, h // group] for h in range(nh)], dim=1)
    v = torch.stack([v[:, h // group] for h in range(nh)], dim=1)
    scores = (q @ k.transpose(-1, -2)) / hd**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, nh * hd)
    return attn.proj(y)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("n_kv", [1, 2])
def test_gqa_forward_equals_manual_reference(preset, n_kv):
    torch.manual_seed(0)
    model = GPT(gqa_cfg(preset, n_kv)).eval()
    hd = 64 // 4
    assert model.blocks[0].attn.qkv.weight.shape == ((4 + 2 * n_kv) * hd, 64)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = model.tok_emb(ids)
        if model.pos_emb is not None:
            x = x + model.pos_emb(torch.arange(24))
        rope = None if model.rope_cos is None else (model.rope_cos[:24], model.rope_sin[:24])
        for block in model.blocks:
            x = x + reference_attention(block.attn, block.norm1(x), rope)
            x = x + block.mlp(block.norm2(x))
        expected = model.lm_head(model.final_norm(x)).float()
        got = model(ids)
    # Same math, different kernels (SDPA vs explicit softmax): float32 round-off only.
    assert (got - expected).abs().max().item() < 1e-5


def test_gqa_with_n_kv_equal_n_heads_is_plain_mha():
    torch.manual_seed(0)
    a = GPT(gqa_cfg("llama", n_kv_heads=None))
    torch.manual_seed(0)
    b = GPT(gqa_cfg("llama", n_kv_heads=4))
    assert resolve_model_config(gqa_cfg("llama", None)).n_kv_heads == 4
    ids = torch.randint(0, 320, (1, 16))
    assert torch.equal(a(ids), b(ids))


def test_gqa_flops_count_model_matmul_weights():
    cfg = gqa_cfg("llama", 1)
    torch.manual_seed(0)
    model = GPT(cfg)
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks."))
    expected = 6 * (matrices + model.lm_head.weight.numel()) + 12 * 2 * 64 * 32
    assert flops_per_token(cfg, seq_len=32) == pytest.approx(expected)
    assert flops_per_token(cfg, 32) < flops_per_token(gqa_cfg("llama", None), 32)


def test_bad_n_kv_heads_is_a_clear_error():
    with pytest.raises(ValueError, match=r"model.n_kv_heads=3 must be >= 1 and divide model.n_heads=4"):
        GPT(gqa_cfg("llama", 3))
    job = JobConfig(model=gqa_cfg("llama", 3))
    with pytest.raises(ConfigError, match=r"model.n_kv_heads=3 must be >= 1 and divide model.n_heads=4"):
        validate(job, 1)
    job = JobConfig(model=gqa_cfg("llama", 1), parallel=ParallelConfig(engine="megatron", tp=2, zero_stage=1),
                    train=TrainConfig(micro_batch_size=2, global_batch_size=8))
    job.data.build_embedded = True
    with pytest.raises(ConfigError, match=r"model.n_kv_heads=1 is not divisible by parallel.tp=2"):
        validate(job, 2)
    job.model.n_kv_heads = 2
    validate(job, 2)


@pytest.mark.parametrize("preset", PRESETS)
def test_gqa_adapter_roundtrip_and_group_layout(preset):
    cfg = gqa_cfg(preset, 2)
    torch.manual_seed(0)
    plain = GPT(cfg).state_dict()
    meg = mm.plain_to_megatron(plain, cfg)
    back = mm.megatron_to_plain(meg, cfg)
    assert set(back) == set(plain) and all(torch.equal(back[k], v) for k, v in plain.items())
    # Megatron's linear_qkv, per query group g: [q heads 2g, 2g+1; k_g; v_g] (4 heads, 2 groups).
    hd, qkv = 16, plain["blocks.0.attn.qkv.weight"]
    rows = lambda t, i: t[i * hd:(i + 1) * hd]  # noqa: E731  (head-sized row block i)
    q_heads, k_heads, v_heads = [rows(qkv, i) for i in range(4)], [rows(qkv, 4 + g) for g in range(2)], \
        [rows(qkv, 6 + g) for g in range(2)]
    expected = torch.cat([q_heads[0], q_heads[1], k_heads[0], v_heads[0],
                          q_heads[2], q_heads[3], k_heads[1], v_heads[1]])
    assert torch.equal(meg["decoder.layers.0.self_attention.linear_qkv.weight"], expected)
    if preset == "gpt2":  # the bias follows the same row order
        b = plain["blocks.1.attn.qkv.bias"]
        mb = meg["decoder.layers.1.self_attention.linear_qkv.bias"]
        assert torch.equal(mb[2 * hd:3 * hd], b[4 * hd:5 * hd])  # k of group 0 after its 2 q heads


_PARITY = """
import json, os, sys, torch, torch.distributed as dist
import dist_llm.parallel.megatron as pkg
ps = pkg.import_parallel_state()
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from dist_llm.config.schema import ModelConfig
from dist_llm.models.gpt import GPT
from dist_llm.parallel.megatron import model as mm

def main(rank, tp, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
    ps.initialize_model_parallel(tp, 1)
    model_parallel_cuda_manual_seed(1)
    res = {}
    for preset in ("gpt2", "llama"):
        cfg = ModelConfig(preset=preset, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, max_seq_len=64,
                          vocab_size=320)
        torch.manual_seed(0)
        plain = GPT(cfg).eval()
        chunk = mm.build_chunks(cfg, mm.transformer_config(cfg, tp=tp))[0].eval()
        full = mm.plain_to_megatron(plain.state_dict(), cfg)
        local = mm.local_params(chunk)
        with torch.no_grad():
            for k, p in local.items():
                src = full.get(k, full["embedding.word_embeddings.weight"] if k == "output_layer.weight" else None)
                p.copy_(mm.tp_slice(k, src, mm.partition_dim(p), rank, tp, preset == "llama"))
            ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(3))
            pos = torch.arange(32).unsqueeze(0).expand(2, -1)
            mask = torch.triu(torch.ones(1, 1, 32, 32, dtype=torch.bool), 1)
            a, b = plain(ids), chunk(ids, pos, mask)  # b: this rank's vocabulary slice of the logits
            vs = 320 // tp
            res[preset] = (a[..., rank * vs:(rank + 1) * vs] - b).abs().max().item()
            if tp == 1:
                back = mm.megatron_to_plain({k: p.detach() for k, p in local.items()}, cfg)
                res[preset + "_back"] = all(torch.equal(back[k], v) for k, v in plain.state_dict().items())
    if rank == 0:
        print("RESULT" + json.dumps(res), flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    tp, port = int(sys.argv[1]), int(sys.argv[2])
    if tp == 1:
        main(0, 1, port)
    else:
        torch.multiprocessing.spawn(main, args=(tp, port), nprocs=tp)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parity(tp: int, tmp_path) -> dict:
    script = tmp_path / "parity.py"
    script.write_text(textwrap.dedent(_PARITY))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(tp), str(_free_port())], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def test_gqa_megatron_logits_equal_plain_tp1(tmp_path):
    res = _parity(1, tmp_path)
    print(res)
    for preset in PRESETS:
        assert res[preset + "_back"], res
        assert res[preset] < 1e-5, res  # same fp32 math, different kernels


@pytest.mark.slow
def test_gqa_megatron_logits_equal_plain_tp2(tmp_path):
    res = _parity(2, tmp_path)
    print(res)
    for preset in PRESETS:
        # Row-parallel projections sum two partial products over gloo: a few ulps of fp32.
        assert res[preset] < 1e-5, res
