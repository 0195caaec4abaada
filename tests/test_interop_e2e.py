"""Fine-tune from a Hugging Face directory through the real CLI: ``model.init_from`` on the local
mock cluster, 2 ranks ZeRO-2 and tp=2 (Megatron), then export the result back to transformers.

The HF model's LM head is scaled up so its loss on the data (~3x ln V) is far from what random
weights give (~ln V): the first logged loss then shows the imported weights were really used.
Tolerance for the first step: the HF loss is a mean over all samples, the run's over its first
global batch (a quarter of them), so 10% relative; ZeRO-2 vs tp=2 on the same batch differ only by
summation order (1e-4 relative).
"""
from __future__ import annotations

import math
import shutil

import pytest
import torch
from helpers import metrics, run_cli

transformers = pytest.importorskip("transformers")

from interop_fixtures import VOCAB, hf_llama, train_hf_tokenizer, write_shards  # noqa: E402

from dist_llm.data import read_shard  # noqa: E402
from dist_llm.data.shards import read_manifest  # noqa: E402
from dist_llm.interop.tokenizer import tokenizer_from_hf_dir  # noqa: E402

pytestmark = pytest.mark.slow
SEQ = 16


def _hf_mean_loss(hf, split_dir) -> float:
    manifest = read_manifest(split_dir)
    rows = [torch.from_numpy(read_shard(split_dir / s["file"], SEQ + 1, manifest["dtype"]).astype("int64"))
            for s in manifest["shards"]]
    batch = torch.cat(rows)
    with torch.no_grad():
        logits = hf(batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1)).item()


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    """A transformers Llama (GQA, untied) with its tokenizer, and real shards tokenized by it:
    ``(hf, hf_dir, tok, data)``, built once and only read by the tests."""
    tmp_path = tmp_path_factory.mktemp("hf_source")
    hf = hf_llama(kv_heads=2, tie=False)
    with torch.no_grad():
        hf.lm_head.weight.mul_(40.0)
    hf_dir = tmp_path / "hf_llama"
    hf.save_pretrained(hf_dir)
    train_hf_tokenizer(hf_dir)
    tok = tokenizer_from_hf_dir(hf_dir)
    data = tmp_path / "data"
    write_shards(data / "train", tok, SEQ, n_samples=32)
    shutil.copy(hf_dir / "tokenizer.json", data / "tokenizer.json")
    return hf, hf_dir, tok, data


def _common(hf_dir, data, steps):
    return ["model=pretrained", f"model.init_from={hf_dir}", "data=shards", f"data.train.0.path={data / 'train'}",
            "data.num_workers=0", "data.lanes=2", f"train.max_steps={steps}", f"train.seq_len={SEQ}",
            "logging=none", "train.ui.progress_bar=off"]


def test_finetune_from_hf_llama_gqa_zero2_and_tp2_then_export(tmp_path, hf_source):
    hf, hf_dir, tok, data = hf_source
    hf_loss = _hf_mean_loss(hf, data / "train")
    assert hf_loss > 2 * math.log(VOCAB)

    common = [*_common(hf_dir, data, 20), "launcher.nproc=2", "optim.lr=1e-3", "optim.warmup_steps=2"]
    runs = {}
    for name, layout in {"zero2": "parallel=zero2", "tp2": "parallel=tp2"}.items():
        run_cli(["train", *common, layout, f"name={name}"], cwd=tmp_path, timeout=400)
        runs[name] = metrics(tmp_path / "runs" / name)
        assert sorted(runs[name]) == list(range(1, 21)), name
        assert abs(runs[name][1] - hf_loss) < 0.1 * hf_loss, (name, runs[name][1], hf_loss)
        assert runs[name][20] < 0.7 * runs[name][1], name  # it fine-tunes
    assert abs(runs["zero2"][1] - runs["tp2"][1]) < 1e-4 * runs["zero2"][1]

    out = tmp_path / "export"
    run_cli(["export", str(tmp_path / "runs" / "tp2"), "--format", "hf", "--out", str(out)], cwd=tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert back.config.num_key_value_heads == 2 and back.config.tie_word_embeddings is False
    assert _hf_mean_loss(back, data / "train") < 0.7 * hf_loss  # the fine-tuned weights came back
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    assert auto("def main():\n")["input_ids"] == tok.encode("def main():\n")


def test_exports_from_zero3_and_tp2_pp2_checkpoints_are_byte_identical(tmp_path, hf_source):
    """The same weights (imported, then one step at lr=1e-30, which rounds away in fp32) saved by
    ZeRO-3 on 2 ranks and by Megatron tp=2 x pp=2 on 4 ranks export to the same bytes, equal to
    the original transformers tensors. The exports run the CLI's entry point in this process (the
    export subprocess is tested above; a new one would spend ~5 s importing transformers)."""
    from safetensors.torch import load_file

    from dist_llm.cli.main import main as cli_main

    hf, hf_dir, _, data = hf_source
    frozen = [*_common(hf_dir, data, 1), "optim.lr=1e-30", "optim.min_lr=0", "optim.warmup_steps=0"]
    outs = {}
    for name, layout in {"z3": ["parallel=zero3", "launcher.nproc=2"],
                         "tp2pp2": ["parallel=tp2_pp2", "launcher.nproc=4"]}.items():
        run_cli(["train", *frozen, *layout, f"name={name}"], cwd=tmp_path, timeout=400)
        outs[name] = tmp_path / f"export_{name}"
        assert cli_main(["export", str(tmp_path / "runs" / name), "--format", "hf", "--out", str(outs[name])]) == 0
    assert (outs["z3"] / "model.safetensors").read_bytes() == (outs["tp2pp2"] / "model.safetensors").read_bytes()
    exported, original = load_file(str(outs["z3"] / "model.safetensors")), hf.state_dict()
    assert set(exported) == set(original)
    for key, tensor in exported.items():
        assert torch.equal(tensor, original[key]), key
