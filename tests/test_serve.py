"""`dist-llm serve` end to end: the official `openai` client against a real uvicorn server on a
free port of 127.0.0.1, serving a tiny random-weight GPT written as one of our checkpoints
(byte tokenizer). Greedy answers are checked against the model's own greedy decoding."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from dist_llm.config.serve_schema import ServeConfig
from dist_llm.data.tokenizer import ByteTokenizer
from dist_llm.serve.app import create_app
from dist_llm.serve.model_loader import load_for_serving
from dist_llm.serve.server import BackgroundServer
from dist_llm.serve.text import render_default_chat
from serve_helpers import write_tiny_checkpoint

MAX_LIMIT = 48


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(ckpt):
    cfg = ServeConfig(model_path=str(ckpt), max_batch_size=8, batch_timeout_ms=50, max_queue=64,
                      max_tokens_limit=MAX_LIMIT, request_timeout_s=60, device="cpu")
    with BackgroundServer(create_app(cfg)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def reference_greedy(ckpt, prompt: str, n: int) -> str:
    """The model's own greedy continuation (plain recompute loop), cut at EOS."""
    from dist_llm.models import generate

    lm = load_for_serving(ServeConfig(model_path=str(ckpt), device="cpu"))
    ids = lm.tokenizer.encode(prompt)
    out = generate(lm.model, torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()
    if lm.tokenizer.eos_id in out:
        out = out[: out.index(lm.tokenizer.eos_id) + 1]
    return lm.tokenizer.decode(out)


def test_models_and_health(server, client, model_id):
    assert model_id == "run/step-00000002"
    h = httpx.get(f"{server.base_url}/health").json()
    assert h["status"] == "ok" and h["model"] == model_id


def test_greedy_completion_is_the_models_greedy_text(client, model_id, ckpt):
    r = client.completions.create(model=model_id, prompt="def main(", max_tokens=20, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == reference_greedy(ckpt, "def main(", 20)
    assert r.usage.prompt_tokens == len("def main(") and 1 <= r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def _stream_text(client, **kw):
    chunks = list(client.completions.create(stream=True, **kw))
    assert chunks and all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices[0].finish_reason is not None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


def test_streamed_chunks_concatenate_to_the_non_streamed_text(client, model_id):
    kw = dict(model=model_id, prompt="import os\n", max_tokens=24, temperature=0)
    full = client.completions.create(**kw)
    text, reason = _stream_text(client, **kw)
    assert text == full.choices[0].text and reason == full.choices[0].finish_reason


def test_stop_string_cuts_the_text_streamed_or_not(client, model_id):
    kw = dict(model=model_id, prompt="class A:", max_tokens=24, temperature=0)
    greedy = client.completions.create(**kw).choices[0].text
    # a character that first appears a few characters in: the answer must end right before it
    i = next(i for i in range(2, len(greedy)) if greedy[i] != "\ufffd" and greedy[i] not in greedy[:i])
    r = client.completions.create(stop=[greedy[i]], **kw)
    assert r.choices[0].text == greedy[:i] and r.choices[0].finish_reason == "stop"
    text, reason = _stream_text(client, stop=greedy[i], **kw)
    assert text == greedy[:i] and reason == "stop"


def test_chat_uses_the_default_template_and_streams_the_same(client, model_id):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(render_default_chat(msgs).encode())
    chunks = list(client.chat.completions.create(model=model_id, messages=msgs, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_seed_makes_sampling_reproducible(client, model_id):
    kw = dict(model=model_id, prompt="x = ", max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (8, 9, 10)}
    assert a == b
    assert len(others | {a}) > 1  # 16 tokens at temperature 1 over 258 ids: seeds do change the text


def test_16_concurrent_requests_are_batched_and_all_answered(server, client, model_id):
    prompts = [f"item_{i} = " for i in range(16)]
    alone = [client.completions.create(model=model_id, prompt=p, max_tokens=8, temperature=0).choices[0].text
             for p in prompts[:4]]
    before = httpx.get(f"{server.base_url}/health").json()
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda p: client.completions.create(model=model_id, prompt=p, max_tokens=8,
                                                                 temperature=0), prompts))
    after = httpx.get(f"{server.base_url}/health").json()
    assert all(len(o.choices) == 1 and o.usage.completion_tokens >= 1 for o in outs)
    assert [o.choices[0].text for o in outs[:4]] == alone  # a batch gives each row its own answer
    assert after["requests"] - before["requests"] == 16
    assert after["batches"] - before["batches"] < 16 and after["max_batch_seen"] > 1


def _error(resp: httpx.Response) -> dict:
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(server, client, model_id, ckpt):
    url = f"{server.base_url}/v1/completions"
    r = httpx.post(url, content=b'{"model": "m", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in _error(r)["message"]
    r = httpx.post(url, json={"model": model_id, "prompt": 5})
    assert r.status_code == 400 and _error(r)["param"] == "prompt"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=model_id, prompt="a", max_tokens=-3)
    with pytest.raises(openai.NotFoundError, match="does not exist") as e:
        client.completions.create(model="gpt-4", prompt="a", max_tokens=3)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="maximum context length") as e:
        client.completions.create(model=model_id, prompt="y" * 90, max_tokens=10)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="at most 96"):
        client.completions.create(model=model_id, prompt="y" * 200, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="above this server's limit"):
        client.completions.create(model=model_id, prompt="a", max_tokens=MAX_LIMIT + 1)
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "a"}], n=2)
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={"model": model_id, "messages": []})
    assert r.status_code == 400 and _error(r)["param"] == "messages"
    assert httpx.get(f"{server.base_url}/v1/nope").status_code == 404
    ok = client.completions.create(model=model_id, prompt="still alive", max_tokens=4, temperature=0)
    assert ok.choices[0].text == reference_greedy(ckpt, "still alive", 4)
    assert httpx.get(f"{server.base_url}/health").json()["status"] == "ok"


def test_token_id_prompts_and_multiple_prompts(client, model_id):
    tok = ByteTokenizer()
    a = client.completions.create(model=model_id, prompt=tok.encode("abc"), max_tokens=5, temperature=0)
    b = client.completions.create(model=model_id, prompt=["abc", "xyz"], max_tokens=5, temperature=0)
    assert [c.index for c in b.choices] == [0, 1] and b.choices[0].text == a.choices[0].text
    assert b.usage.prompt_tokens == 6


def test_sse_wire_format_ends_with_done(server, model_id):
    body = {"model": model_id, "prompt": "q", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.slow
def test_serves_a_checkpoint_written_by_a_real_training_run(workdir):
    """`dist-llm train` (1 rank, 4 steps) -> `create_app` over its run directory: the manifest's
    config, the tied LM head and the relative path of the embedded corpus all resolve."""
    from helpers import TINY, run_cli

    run_cli(["train", *TINY, "name=srv", "launcher.nproc=1", "train.max_steps=4", "train.eval_every=0",
             "train.checkpoint.every=0"], cwd=workdir)
    run = workdir / "runs" / "srv"
    cfg = ServeConfig(model_path=str(run), device="cpu", max_tokens_limit=16)
    with BackgroundServer(create_app(cfg)) as srv:
        c = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0)
        r = c.completions.create(model="srv", prompt="def ", max_tokens=8, temperature=0)
    assert r.choices[0].text == reference_greedy(run, "def ", 8)
