"""int8 quantization (torchao) of tiny GPTs trained on the embedded corpus: every linear converted
(counted), linear-weight bytes >= 3.5x smaller, perplexity within 2% of fp32, save -> load gives
identical logits, nothing pickled."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("torchao")

from dist_llm.cli.main import main as cli_main  # noqa: E402
from dist_llm.compress import CompressError  # noqa: E402
from dist_llm.compress.quantize import (is_int8, linear_names, linear_weight_bytes, load_quantized,  # noqa: E402
                                        quantize_model, save_quantized)
from dist_llm.compress.quantize_cmd import run_quantize  # noqa: E402
from dist_llm.compress.source import load_checkpoint_model  # noqa: E402
from dist_llm.config.compress_schema import EvalLMConfig, QuantizeConfig, QuantMode  # noqa: E402

EVAL = EvalLMConfig(batch_size=16, max_batches=8)


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", list(QuantMode))
def test_quantize_every_linear_size_and_quality(compress_runs, tmp_path, preset, mode):
    report = run_quantize(QuantizeConfig(source=str(compress_runs[preset]), out=str(tmp_path / "q"), mode=mode,
                                         eval=EVAL))
    n_layers = 2
    per_block = 5 if preset == "llama" else 4  # qkv, proj, fc_in, (fc_gate), fc_out
    assert report["linears"] == report["converted"] == n_layers * per_block + 1  # + the LM head
    assert report["bytes_ratio"] >= 3.5, report["bytes_ratio"]
    assert abs(report["ppl_rel_change"]) < 0.02, report["stages"]
    assert report["reload_matches"]
    fp32, int8, _ = report["stages"]
    assert int8["file_bytes"] < fp32["file_bytes"]


@pytest.mark.parametrize("mode", list(QuantMode))
def test_save_load_identical_logits_without_pickle(compress_runs, tmp_path, mode):
    model = load_checkpoint_model(str(compress_runs["gpt2"])).model
    assert model.lm_head.weight is model.tok_emb.weight  # gpt2: tied
    float_bytes = linear_weight_bytes(model)
    quantize_model(model, mode)
    assert model.lm_head.weight is not model.tok_emb.weight  # untied, head int8, embedding float
    assert all(is_int8(dict(model.named_modules())[n].weight) for n in linear_names(model))
    assert not is_int8(model.tok_emb.weight)
    assert float_bytes / linear_weight_bytes(model) >= 3.5
    out = save_quantized(model, mode, str(tmp_path / "q"), {}, {})
    assert sorted(p.name for p in out.iterdir()) == ["quantization.json", "quantized.safetensors"]
    with safe_open(str(out / "quantized.safetensors"), "pt") as f:
        assert f.get_tensor("blocks.0.attn.qkv.weight.qdata").dtype == torch.int8
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["mode"] == mode.value and len(meta["linears"]) == 9
    again = load_quantized(str(out))
    ids = torch.randint(0, model.cfg.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_a_layer_left_in_float_is_an_error(compress_runs, monkeypatch):
    """Simulate a tool that silently skips a layer: quantize_ leaves fc_out of block 1 alone."""
    import torchao.quantization as tq

    real = tq.quantize_

    def skipping(model, config, filter_fn=None, **kw):
        return real(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and
                    fqn != "blocks.1.mlp.fc_out", **kw)

    monkeypatch.setattr(tq, "quantize_", skipping)
    model = load_checkpoint_model(str(compress_runs["gpt2"])).model
    with pytest.raises(CompressError, match=r"left 1 of 9 linear layers in float: blocks\.1\.mlp\.fc_out"):
        quantize_model(model, QuantMode.WEIGHT_ONLY)


def test_cli_quantize(compress_runs, tmp_path, capsys):
    out = tmp_path / "q"
    rc = cli_main(["quantize", str(compress_runs["llama"]), "--out", str(out), "--mode", "dynamic",
                   "--eval-batches", "4", "--eval-batch-size", "16"])
    printed = capsys.readouterr().out
    assert rc == 0 and "int8 dynamic" in printed
    assert json.loads((out / "compress_report.json").read_text())["converted"] == 11
    assert cli_main(["quantize", str(compress_runs["llama"]), "--out", str(out)]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
