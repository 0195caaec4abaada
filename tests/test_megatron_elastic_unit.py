"""Elastic resume, Megatron side, fast part: the per-parameter name maps plain <-> Megatron-full
that move optimizer state one parameter at a time, and the box reader of ``sharded/`` on a torch
DCP checkpoint written here (layer-stacked tensors as Megatron's dist_checkpointing stores them)."""
from __future__ import annotations

import pytest
import torch

from dist_llm.config.schema import ModelConfig
from dist_llm.models.gpt import GPT
from dist_llm.parallel.megatron import model as mm
from dist_llm.parallel.megatron.elastic import ShardedReader

CFGS = {
    "gpt2": ModelConfig(preset="gpt2", n_layers=2, n_heads=4, d_model=64, max_seq_len=64, vocab_size=320),
    "llama": ModelConfig(preset="llama", n_layers=2, n_heads=4, d_model=64, max_seq_len=64, vocab_size=320),
    "llama-gqa": ModelConfig(preset="llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, max_seq_len=64,
                             vocab_size=320),
}


@pytest.mark.parametrize("name", sorted(CFGS))
def test_per_parameter_maps_agree_with_the_whole_state_dict_adapter(name):
    cfg = CFGS[name]
    torch.manual_seed(0)
    plain = GPT(cfg).state_dict()
    meg = mm.plain_to_megatron(plain, cfg)
    for p, t in plain.items():  # plain -> the Megatron tensor holding it -> back
        holder = mm.megatron_holder(p, cfg)
        assert holder in meg, p
        assert torch.equal(mm.plain_from_megatron_full(p, meg[holder], cfg), t), p
    for m, t in meg.items():  # Megatron tensor <- its plain sources
        sources = mm.plain_sources(m, cfg)
        assert all(mm.megatron_holder(s, cfg) == m for s in sources), (m, sources)
        assert torch.equal(mm.megatron_full_from_plain(m, {s: plain[s] for s in sources}, cfg), t), m
    if cfg.preset == "gpt2":  # the last pipeline stage's copy of the tied head is the token embedding
        assert mm.plain_sources("output_layer.weight", cfg) == ["tok_emb.weight"]
    else:
        assert mm.plain_sources("decoder.layers.1.mlp.linear_fc1.weight", cfg) == [
            "blocks.1.mlp.fc_gate.weight", "blocks.1.mlp.fc_in.weight"]


def test_sharded_reader_reads_one_layer_box(tmp_path):
    """Layer-stacked tensors (as Megatron stores them; the TP-chunked case is the real tp=2 x pp=2
    checkpoint of test_megatron_elastic.py): the reader returns one layer's slab, finds the
    TE-style norm key from the local name, and needs no process group."""
    import torch.distributed.checkpoint as dcp

    qkv = torch.randn(3, 12, 4)
    norm = torch.randn(3, 4)
    dcp.save({"decoder.layers.self_attention.linear_qkv.weight": qkv,
              "decoder.layers.self_attention.linear_qkv.layer_norm_weight": norm,
              "embedding.word_embeddings.weight": torch.arange(6.0).reshape(3, 2)},
             storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    r = ShardedReader(tmp_path)
    box = r.locate("decoder.layers.2.input_layernorm.weight")
    assert box == ("decoder.layers.self_attention.linear_qkv.layer_norm_weight", 2)
    got = r.read({"q": r.locate("decoder.layers.1.self_attention.linear_qkv.weight"), "n": box,
                  "e": r.locate("embedding.word_embeddings.weight")})
    assert torch.equal(got["q"], qkv[1]) and torch.equal(got["n"], norm[2])
    assert torch.equal(got["e"], torch.arange(6.0).reshape(3, 2))
    with pytest.raises(KeyError, match="no tensor 'optimizer.exp_avg.decoder.final_layernorm.weight'"):
        r.locate("decoder.final_layernorm.weight", "optimizer.exp_avg.")
