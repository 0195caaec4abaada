"""`dist-llm serve` on a Hugging Face directory: a real `transformers` Llama (BPE tokenizer with a
chat template in tokenizer_config.json) saved with save_pretrained, and one of our checkpoints
exported with `dist-llm export --format hf`; the official `openai` client against a real server.
Greedy answers are checked against `transformers`' own greedy `generate`, and the chat prompt
against `AutoTokenizer.apply_chat_template`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import openai
import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))

from dist_llm.cli.main import main as cli_main  # noqa: E402
from dist_llm.config.serve_schema import ServeConfig  # noqa: E402
from dist_llm.serve.app import create_app  # noqa: E402
from dist_llm.serve.model_loader import ModelLoadError, load_for_serving  # noqa: E402
from dist_llm.serve.server import BackgroundServer  # noqa: E402
from interop_fixtures import hf_llama, train_hf_tokenizer  # noqa: E402
from serve_helpers import write_tiny_checkpoint  # noqa: E402

# a minimal ChatML-style template, as tokenizer_config.json carries it
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def _hf_greedy(hf_dir: Path, prompt_ids, n: int) -> list:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    ids = torch.tensor([prompt_ids])  # explicit mask: the chat prompt starts with <s>, which must not be padding
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=2,
                      eos_token_id=hf.generation_config.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_hf")
    train_hf_tokenizer(root / "llama")
    model = hf_llama(kv_heads=2)
    with torch.no_grad():  # a wider init than HF's 0.02 so greedy text varies
        for p in model.parameters():
            p.mul_(8.0) if p.dim() == 2 else None
    model.save_pretrained(root / "llama")
    cfg_file = root / "llama" / "tokenizer_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "chat_template": TEMPLATE}))
    return root / "llama"


@pytest.fixture(scope="module")
def client(hf_dir):
    cfg = ServeConfig(model_path=str(hf_dir), max_batch_size=4, batch_timeout_ms=20, max_tokens_limit=32,
                      request_timeout_s=60, device="cpu")
    with BackgroundServer(create_app(cfg)) as srv:
        yield openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0, timeout=60)


def test_hf_dir_completion_equals_transformers_greedy(client, hf_dir):
    auto = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert [m.id for m in client.models.list().data] == ["llama"]
    prompt = "def main(argv):\n"
    r = client.completions.create(model="llama", prompt=prompt, max_tokens=12, temperature=0)
    ids = auto(prompt, add_special_tokens=False)["input_ids"]
    want = _hf_greedy(hf_dir, ids, 12)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].text == auto.decode(want, skip_special_tokens=True)


def test_hf_dir_chat_uses_the_tokenizer_chat_template(client, hf_dir):
    auto = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "import os"}]
    r = client.chat.completions.create(model="llama", messages=msgs, max_tokens=8, temperature=0)
    rendered = auto.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = auto(rendered, add_special_tokens=False)["input_ids"]
    assert r.usage.prompt_tokens == len(ids)  # our rendering == transformers' rendering
    want = _hf_greedy(hf_dir, ids, 8)
    assert r.choices[0].message.content == auto.decode(want, skip_special_tokens=True)


def test_serves_our_export_like_the_checkpoint(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path)
    out = tmp_path / "export"
    assert cli_main(["export", str(ckpt), "--format", "hf", "--out", str(out)]) == 0
    answers = []
    for path in (ckpt, out):
        cfg = ServeConfig(model_path=str(path), max_tokens_limit=16, device="cpu", model_name="m")
        with BackgroundServer(create_app(cfg)) as srv:
            c = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0, timeout=60)
            answers.append(c.completions.create(model="m", prompt="class A:", max_tokens=12, temperature=0))
    assert answers[0].choices[0].text == answers[1].choices[0].text
    assert answers[0].usage == answers[1].usage


def test_hf_dir_errors_name_the_directory(tmp_path, hf_dir):
    import shutil

    no_tok = tmp_path / "no_tok"
    shutil.copytree(hf_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        load_for_serving(ServeConfig(model_path=str(no_tok), device="cpu"))
    bert = tmp_path / "bert"
    transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(bert)
    with pytest.raises(ModelLoadError, match="bert"):
        load_for_serving(ServeConfig(model_path=str(bert), device="cpu"))
