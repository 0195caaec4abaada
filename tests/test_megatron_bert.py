"""Megatron BERT, fast part: the plain <-> Megatron BERT adapter both ways, Megatron's BertModel
(post-LN spec) at tp=1 against our plain BERT on the same batch, and the validation rules for
BERT on the Megatron engine. Megatron is imported only in a subprocess (its CPU layer is
process-wide), as in test_megatron_model.py.

Tolerance of the parity check: both models run the same fp32 math in another order (Megatron's
baddbmm attention with a -10000 mask fill vs torch SDPA with a boolean mask; a vocab-parallel
cross entropy vs F.cross_entropy), which moves the last few bits: observed ~2e-7 absolute on
logits of magnitude ~1, so 1e-5 relative (to the largest logit / the loss) has 50x headroom
and still catches any wrong mapping (a swapped norm or head is off by O(1e-1)).
"""
from __future__ import annotations

import json

import pytest
import torch

from dist_llm.config.schema import EncoderConfig, JobConfig, ModelConfig, ParallelConfig, TaskConfig, TrainConfig
from dist_llm.config.validate import ConfigError, validate
from dist_llm.models.bert import Bert
from dist_llm.parallel.megatron import bert_model as bm
from dist_llm.parallel.megatron import model as mm

from test_megatron_model import _python

ECFG = EncoderConfig(n_layers=2, n_heads=4, d_model=64, d_ff=128, vocab_size=96, max_seq_len=32, norm_eps=1e-12)


def test_bert_adapter_roundtrip_and_qkv_layout():
    torch.manual_seed(0)
    plain = Bert(ECFG).state_dict()
    meg = bm.plain_to_megatron(plain, ECFG)
    assert len(meg) == len(plain)  # one Megatron tensor per plain tensor (the LM weight is tied, not copied)
    back = bm.megatron_to_plain(meg, ECFG)
    assert set(back) == set(plain)
    for k, v in plain.items():
        assert torch.equal(back[k], v), k
    # fused QKV interleaved per head: rows of head h are [q_h; k_h; v_h]
    hd, d = 16, 64
    qkv, mq = plain["layers.1.attn.qkv.weight"], meg["encoder.layers.1.self_attention.linear_qkv.weight"]
    for h in range(4):
        for j in range(3):
            assert torch.equal(mq[(3 * h + j) * hd:(3 * h + j + 1) * hd], qkv[j * d + h * hd:j * d + (h + 1) * hd])
    assert torch.equal(meg["output_layer.bias"], plain["mlm_bias"])
    assert torch.equal(meg["encoder.layers.0.self_attn_bda.norm.weight"], plain["layers.0.attn_norm.weight"])
    # TP slices of the vocab-split tensors merge back exactly
    for name in ("embedding.word_embeddings.weight", "output_layer.bias",
                 "encoder.layers.0.self_attention.linear_qkv.weight"):
        parts = [mm.tp_slice(name, meg[name], 0, r, 2, gated=False) for r in range(2)]
        assert torch.equal(mm.tp_merge(name, parts, 0, gated=False), meg[name])
    with pytest.raises(KeyError, match="no Megatron name"):
        bm.plain_to_megatron({"layers.0.attn.bogus.weight": torch.zeros(1)}, ECFG)


def test_megatron_bert_equals_plain_bert_at_tp1():
    """Same weights, same batch (padding, two segments, masked labels): MLM logits at real
    tokens, NSP logits, the loss and all four task metrics agree. (Padded positions differ and
    do not matter: Megatron's b1ss mask also masks padded *queries*, whose outputs nothing reads.
    A row without any real token, which real BERT data never has, would differ too.)"""
    out = _python("""
        import json, types, torch, torch.distributed as dist
        import dist_llm.parallel.megatron as pkg
        ps = pkg.import_parallel_state()
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        from dist_llm.config.schema import EncoderConfig, JobConfig, ModelConfig, TaskConfig
        from dist_llm.models.bert import Bert
        from dist_llm.parallel.megatron import bert_model as bm
        from dist_llm.parallel.megatron.bert_arch import BertArch
        from dist_llm.train.tasks.mlm_nsp import MlmNspTask
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        ps.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(1)
        ecfg = EncoderConfig(n_layers=2, n_heads=4, d_model=64, d_ff=128, vocab_size=96, max_seq_len=32,
                             norm_eps=1e-12)
        torch.manual_seed(0)
        plain = Bert(ecfg).eval()
        with torch.no_grad():  # non-trivial norms and biases, so a swapped mapping cannot hide
            for n, p in plain.named_parameters():
                if "norm" in n or n.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
        chunk = bm.build_chunks(ecfg, bm.transformer_config(ecfg))[0].eval()
        full = bm.plain_to_megatron(plain.state_dict(), ecfg)
        local = bm.local_params(chunk)
        res = {"names_match": sorted(local) == sorted(full)}
        g = torch.Generator().manual_seed(3)
        B, T = 4, 32
        ids = torch.randint(5, 96, (B, T), generator=g)
        attn = torch.ones(B, T, dtype=torch.long)
        attn[1, 20:] = 0; attn[2, 6:] = 0; attn[3, 1:] = 0  # row 3: [CLS] alone
        labels = torch.where((torch.rand(B, T, generator=g) < 0.3) & attn.bool(), ids, torch.full_like(ids, -100))
        batch = {"input_ids": ids * attn, "token_type_ids": (torch.arange(T) >= 12).long().expand(B, -1).clone(),
                 "attention_mask": attn, "mlm_labels": labels, "nsp_labels": torch.tensor([0, 1, 1, 0])}
        cfg = JobConfig(model=ModelConfig(preset="bert", vocab_size=96), task=TaskConfig(kind="mlm_nsp"))
        engine = types.SimpleNamespace(layout=types.SimpleNamespace(device=torch.device("cpu"), tp=1, tp_rank=0))
        with torch.no_grad():
            for k, p in local.items():
                p.copy_(full[k])
            ref = plain(batch["input_ids"], batch["token_type_ids"], attn)
            mlm, nsp = chunk(batch["input_ids"], attn, tokentype_ids=batch["token_type_ids"])
            keep = attn.bool()
            res["mlm_logits"] = ((ref.mlm_logits[keep] - mlm[keep]).abs().max() / ref.mlm_logits.abs().max()).item()
            res["nsp_logits"] = ((ref.nsp_logits - nsp).abs().max() / ref.nsp_logits.abs().max()).item()
            ref_loss, ref_m = MlmNspTask(cfg).loss(plain, batch)
            loss, m = BertArch(ecfg).micro_batch_loss(engine, chunk, batch)
        res["loss"] = abs(loss.item() - ref_loss.item()) / ref_loss.item()
        res["metrics"] = {k: [[float(a), float(b)] for a, b in (ref_m[k], m[k])] for k in ref_m}
        res["extra_metrics"] = sorted(set(m) - set(ref_m))
        back = bm.megatron_to_plain({k: p.detach() for k, p in local.items()}, ecfg)
        res["back"] = all(torch.equal(back[k], v) for k, v in plain.state_dict().items())
        print("RESULT" + json.dumps(res))
    """)
    res = json.loads(out.stdout.split("RESULT", 1)[1])
    print({k: v for k, v in res.items() if isinstance(v, float)})
    assert res["names_match"] and res["back"] and not res["extra_metrics"], res
    for key in ("mlm_logits", "nsp_logits", "loss"):
        assert res[key] < 1e-5, res
    for name, (ref, got) in res["metrics"].items():
        assert got[1] == ref[1], (name, res["metrics"])  # same counts
        assert abs(got[0] - ref[0]) <= 1e-5 * max(abs(ref[0]), 1.0), (name, res["metrics"])


def _bert_job(world: int, task: str = "mlm_nsp", preset: str = "bert", **par) -> JobConfig:
    model = ModelConfig(preset=preset, n_layers=2, n_heads=4, d_model=64, vocab_size=128, max_seq_len=64)
    cfg = JobConfig(model=model, task=TaskConfig(kind=task),
                    parallel=ParallelConfig(engine="megatron", **{"zero_stage": 1, **par}),
                    train=TrainConfig(micro_batch_size=2, global_batch_size=8, seq_len=64))
    cfg.data.build_embedded = True
    return cfg


def test_bert_on_megatron_validation():
    validate(_bert_job(2, tp=2), 2)  # task=mlm_nsp at tp=2, pp=1
    validate(_bert_job(4, tp=2, zero_stage=2), 4)
    for world, kw, needle in [
        (2, dict(pp=2), "parallel.pp=2 with model.preset=bert: the Megatron BERT runs at parallel.pp=1 only"),
        (2, dict(tp=2, sp=True), "parallel.sp=true with model.preset=bert"),
        (2, dict(task="classify", tp=2), "task.kind=classify with model.preset=bert is not supported by "
                                         "parallel.engine=megatron"),
        (2, dict(task="classify", preset="vit", tp=2), "use parallel.engine=deepspeed"),
    ]:
        with pytest.raises(ConfigError) as e:
            validate(_bert_job(world, **kw), world)
        assert needle in str(e.value), str(e.value)
