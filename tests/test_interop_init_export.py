"""``model.init_from`` from Hugging Face dirs and our checkpoints, and ``dist-llm export --format hf``,
against real transformers classes (tiny random models built here; nothing downloads).

Tolerance 1e-4 max abs on logits: fp32 on CPU, same weights; only summation order differs
(fused vs split projections, SDPA vs eager attention), measured around 1e-6.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from interop_fixtures import TEXT, VOCAB, hf_gpt2, hf_llama, train_hf_tokenizer, write_shards  # noqa: E402

from dist_llm.checkpoint.manager import CheckpointManager  # noqa: E402
from dist_llm.cli.main import main as cli_main  # noqa: E402
from dist_llm.config.schema import DataConfig, DatasetSource, JobConfig, ModelConfig  # noqa: E402
from dist_llm.config.store import config_to_dict  # noqa: E402
from dist_llm.data.tokenizer import ByteTokenizer  # noqa: E402
from dist_llm.interop import InteropError  # noqa: E402
from dist_llm.interop.init_from import derive_model_config, load_into, resolve_init_from  # noqa: E402
from dist_llm.interop.tokenizer import tokenizer_from_hf_dir  # noqa: E402
from dist_llm.models import build_model, generate  # noqa: E402
from compress_fixtures import SingleRank, WeightsEngine  # noqa: E402  (shared single-rank save stand-ins)

TOL = 1e-4


def _ids(vocab=VOCAB, n=20):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))


def _hf_dir(tmp_path, hf_model, name):
    out = tmp_path / name
    hf_model.save_pretrained(out)
    train_hf_tokenizer(out)
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_init_from_hf_dir_gives_hf_logits_and_tokenizer(tmp_path, kind):
    hf_model = hf_gpt2() if kind == "gpt2" else hf_llama(kv_heads=2, tie=False)
    hf_dir = _hf_dir(tmp_path, hf_model, kind)
    cfg, state, tok = resolve_init_from(ModelConfig(init_from=str(hf_dir), dropout=0.1))
    assert cfg.preset == kind and cfg.vocab_size == VOCAB and cfg.dropout == 0.1  # training choice kept
    model = build_model(cfg).eval()
    load_into(model, state, str(hf_dir))
    ids = _ids()
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max().item() < TOL
    auto = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert tok.encode(TEXT) == auto(TEXT)["input_ids"] and tok.eos_id == auto.eos_token_id


def test_init_from_errors_name_file_and_field(tmp_path):
    hf_dir = _hf_dir(tmp_path, hf_gpt2(), "gpt2")
    with pytest.raises(InteropError, match=r"model.n_layers=3 .*config.json.*n_layers=2"):
        derive_model_config(ModelConfig(init_from=str(hf_dir), n_layers=3))
    assert derive_model_config(ModelConfig(init_from=str(hf_dir), n_layers=2, d_model=32)).n_layers == 2
    # pickled weights only: refused, never unpickled
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(hf_dir / "config.json", pickled / "config.json")
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(InteropError, match="pytorch_model.bin.*pickled weights are refused"):
        resolve_init_from(ModelConfig(init_from=str(pickled)))
    # another architecture
    other = tmp_path / "t5"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(InteropError, match=r"t5.*config.json.*model_type='t5'"):
        derive_model_config(ModelConfig(init_from=str(other)))
    # a tokenizer larger than the model's vocabulary
    small = tmp_path / "small"
    hf_gpt2(vocab=97).save_pretrained(small)
    train_hf_tokenizer(small)
    with pytest.raises(InteropError, match=r"300 tokens but the model's vocab_size is 97"):
        resolve_init_from(ModelConfig(init_from=str(small)))
    with pytest.raises(InteropError, match="not a directory"):
        derive_model_config(ModelConfig(init_from=str(tmp_path / "nope")))


def _our_checkpoint(tmp_path, cfg: ModelConfig, tok, name: str):
    """Random weights saved through the real CheckpointManager, with real shards for the tokenizer."""
    data_dir = tmp_path / f"data_{name}"
    write_shards(data_dir / "train", tok, seq_len=16)
    if hasattr(tok, "path"):
        shutil.copy(tok.path, data_dir / "tokenizer.json")
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    job = JobConfig(model=cfg, data=DataConfig(train=[DatasetSource(path=str(data_dir / "train"))]))
    run_dir = tmp_path / f"run_{name}"
    path = CheckpointManager(run_dir, SingleRank(), keep_last=2).save(
        7, WeightsEngine(model), {"step": 7}, {}, config_to_dict(job))
    return model, path, run_dir


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_export_loads_in_transformers_with_same_logits_generation_and_tokens(tmp_path, kind):
    if kind == "gpt2":  # tied embeddings, byte tokenizer
        cfg = ModelConfig(preset="gpt2", n_layers=2, n_heads=4, d_model=32, max_seq_len=64, vocab_size=VOCAB,
                          init_std=0.2)
        tok = ByteTokenizer()
    else:  # untied, GQA when available, BPE tokenizer
        cfg = ModelConfig(preset="llama", n_layers=2, n_heads=4, d_model=32, max_seq_len=64, vocab_size=VOCAB,
                          init_std=0.2, n_kv_heads=2)
        tok = tokenizer_from_hf_dir(train_hf_tokenizer(tmp_path / "bpe"))
    ours, ckpt, run_dir = _our_checkpoint(tmp_path, cfg, tok, kind)
    out = tmp_path / f"export_{kind}"
    source = run_dir if kind == "gpt2" else ckpt  # a run dir resolves to its latest checkpoint
    assert cli_main(["export", str(source), "--format", "hf", "--out", str(out)]) == 0
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in out.iterdir()}

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if kind == "gpt2" else "LlamaForCausalLM")
    if kind == "llama":
        assert hf.config.tie_word_embeddings is False
        assert hf.config.num_key_value_heads == 2
    ids = _ids()
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < TOL
    prompt = ids[:1, :8]
    mine = generate(ours, prompt, 32, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert mine.shape == (1, 40) and torch.equal(mine, theirs)

    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    assert auto(TEXT)["input_ids"] == tok.encode(TEXT)
    assert auto.eos_token_id == tok.eos_id == hf.generation_config.eos_token_id
    # the same export twice is byte-identical (deterministic file content)
    again = tmp_path / f"again_{kind}"
    assert cli_main(["export", str(ckpt), "--format", "hf", "--out", str(again)]) == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_export_errors(tmp_path, capsys):
    cfg = ModelConfig(preset="gpt2", n_layers=1, n_heads=2, d_model=16, max_seq_len=16, vocab_size=VOCAB)
    _, ckpt, _ = _our_checkpoint(tmp_path, cfg, ByteTokenizer(), "e")
    out = tmp_path / "exists"
    out.mkdir()
    assert cli_main(["export", str(ckpt), "--format", "hf", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    hf_dir = tmp_path / "hf"
    hf_gpt2().save_pretrained(hf_dir)
    assert cli_main(["export", str(hf_dir), "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    assert "already a Hugging Face directory" in capsys.readouterr().err


def test_init_from_our_checkpoint_and_best_dir(tmp_path):
    cfg = ModelConfig(preset="llama", n_layers=2, n_heads=4, d_model=32, max_seq_len=32, vocab_size=VOCAB)
    ours, ckpt, run_dir = _our_checkpoint(tmp_path, cfg, ByteTokenizer(), "own")
    best = run_dir / "best"
    best.mkdir()
    shutil.copy(ckpt / "model.safetensors", best / "model.safetensors")
    (best / "info.json").write_text(json.dumps({"step": 7, "val_loss": 1.0}))
    ids = _ids(n=10)
    for source in (ckpt, run_dir, best):
        got, state, tok = resolve_init_from(ModelConfig(init_from=str(source)))
        assert got.preset == "llama" and got.n_layers == 2 and tok.kind == "byte"
        model = build_model(got).eval()
        load_into(model, state, str(source))
        with torch.no_grad():
            assert torch.equal(model(ids), ours(ids)), source


def test_training_data_must_use_the_source_tokenizer(tmp_path):
    from dist_llm.interop.init_from import check_data_tokenizer

    hf_dir = _hf_dir(tmp_path, hf_gpt2(), "gpt2")
    tok = tokenizer_from_hf_dir(hf_dir)
    good, bad = tmp_path / "good", tmp_path / "bad"
    write_shards(good / "train", tok, seq_len=16)
    shutil.copy(hf_dir / "tokenizer.json", good / "tokenizer.json")
    write_shards(bad / "train", ByteTokenizer(), seq_len=16)
    check_data_tokenizer(tok, DataConfig(train=[DatasetSource(path=str(good / "train"))]), str(hf_dir))
    with pytest.raises(InteropError, match=r"bad/train was tokenized with a different tokenizer \(byte"):
        check_data_tokenizer(tok, DataConfig(train=[DatasetSource(path=str(bad / "train"))]), str(hf_dir))
    with pytest.raises(InteropError, match=r"embedded corpus\) was tokenized with a different tokenizer"):
        check_data_tokenizer(tok, DataConfig(build_embedded=True), str(hf_dir))


def test_init_from_sharded_safetensors(tmp_path):
    hf_model = hf_llama(kv_heads=2, tie=False)
    out = tmp_path / "sharded"
    hf_model.save_pretrained(out, max_shard_size="50KB")
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    cfg, state, tok = resolve_init_from(ModelConfig(init_from=str(out)))
    assert tok is None  # no tokenizer files there: the run keeps the data's tokenizer
    model = build_model(cfg).eval()
    load_into(model, state, str(out))
    ids = _ids()
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max().item() < TOL
