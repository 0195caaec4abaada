"""Serving parts on their own: the batching scheduler, streamed-text assembly, checkpoint
resolution, the CLI's config parsing; and the 503 (queue full) / 504 (timeout) paths of the
real server, with the model held back by a gate so the timing is not left to chance."""
from __future__ import annotations

import shutil
import threading
import time

import httpx
import openai
import pytest

from dist_llm.cli.serve import parse_serve_config
from dist_llm.config.serve_schema import ServeBackend, ServeConfig
from dist_llm.data.tokenizer import ByteTokenizer
from dist_llm.serve import app as app_mod
from dist_llm.serve.model_loader import ModelLoadError, default_model_name, load_for_serving
from dist_llm.serve.scheduler import BatchScheduler, QueueFullError
from dist_llm.serve.server import BackgroundServer
from dist_llm.serve.text import TextAssembler, cut_at_stop
from serve_helpers import write_tiny_checkpoint


# --- scheduler ---
def _echo_runner(log):
    def run(prompts, params, on_token):
        log.append(len(prompts))
        if on_token:
            for row in range(len(prompts)):
                on_token(row, 100 + row)
        return [("done", p, prm) for p, prm in zip(prompts, params)]
    return run


def test_scheduler_batches_concurrent_requests_up_to_the_limit():
    sizes = []
    s = BatchScheduler(_echo_runner(sizes), max_batch_size=4, batch_timeout_ms=200, max_queue=16)
    futs = [s.submit([i], f"p{i}") for i in range(10)]  # queued before the worker starts
    s.start()
    try:
        results = [f.result(timeout=10) for f in futs]
    finally:
        s.stop()
    assert results == [("done", [i], f"p{i}") for i in range(10)]
    assert sizes == [4, 4, 2] and s.stats.requests == 10 and s.stats.max_batch_seen == 4


def test_scheduler_streams_tokens_to_the_right_request():
    got = {0: [], 1: []}
    s = BatchScheduler(_echo_runner([]), max_batch_size=2, batch_timeout_ms=200, max_queue=4)
    futs = [s.submit([0], None, got[0].append), s.submit([1], None, got[1].append)]
    s.start()
    try:
        [f.result(timeout=10) for f in futs]
    finally:
        s.stop()
    assert got == {0: [100], 1: [101]}


def test_scheduler_queue_is_bounded_and_a_failed_batch_fails_only_itself():
    gate, calls = threading.Event(), []

    def run(prompts, params, on_token):
        gate.wait(10)
        calls.append(prompts)
        if prompts == [[666]]:
            raise RuntimeError("boom")
        return [p for p in prompts]

    s = BatchScheduler(run, max_batch_size=1, batch_timeout_ms=0, max_queue=2).start()
    try:
        bad = s.submit([666], None)
        while s.queued():  # the worker holds the bad one (blocked on the gate)
            time.sleep(0.01)
        good, cancelled = s.submit([1], None), s.submit([2], None)
        with pytest.raises(QueueFullError, match="queue is full"):
            s.submit([3], None)
        assert cancelled.cancel()  # the caller gave up before its batch started: it is skipped
        gate.set()
        with pytest.raises(RuntimeError, match="boom"):
            bad.result(timeout=10)
        assert good.result(timeout=10) == [1] and s.alive
        time.sleep(0.2)
        assert [2] not in calls
    finally:
        s.stop()


# --- text assembly ---
def test_assembler_holds_back_split_utf8_and_stop_prefixes():
    tok = ByteTokenizer()
    ids = tok.encode("héllo END more")
    asm = TextAssembler(tok.decode, ["END"])
    deltas = [asm.push(i) for i in ids]
    assert "\ufffd" not in "".join(deltas)  # the 2-byte é never leaks out half-done
    last, full, hit = asm.finish()
    assert hit and full == "héllo " and "".join(deltas) + last == full
    assert cut_at_stop("abc", ["x", "b"]) == ("a", True) and cut_at_stop("abc", []) == ("abc", False)


# --- model loading ---
def test_loader_accepts_checkpoint_best_and_run_dirs_and_rejects_the_rest(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path)
    run = ckpt.parents[1]
    best = run / "best"
    best.mkdir()
    shutil.copy(ckpt / "model.safetensors", best / "model.safetensors")
    (best / "info.json").write_text('{"step": 2, "val_loss": 1.0}')
    for path, name in ((ckpt, "run/step-00000002"), (run, "run"), (best, "run/best")):
        lm = load_for_serving(ServeConfig(model_path=str(path), device="cpu"))
        assert lm.name == name == default_model_name(path) and lm.max_seq_len == 96
        assert lm.tokenizer.kind == "byte" and lm.stop_token_ids == (256,) and not lm.model.training
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_for_serving(ServeConfig(model_path=str(tmp_path / "nope")))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):  # routed to the HF loader
        load_for_serving(ServeConfig(model_path=str(hf)))
    shutil.rmtree(tmp_path / "data")
    with pytest.raises(ModelLoadError, match="--tokenizer-dir"):
        load_for_serving(ServeConfig(model_path=str(ckpt), device="cpu"))
    with open(ckpt / "model.safetensors", "ab") as f:
        f.write(b"x")
    with pytest.raises(ModelLoadError, match="sha256"):
        load_for_serving(ServeConfig(model_path=str(ckpt), device="cpu"))


# --- CLI ---
def test_cli_flags_and_overrides_build_a_validated_config():
    cfg = parse_serve_config(["runs/x", "--port", "9001", "--max-batch-size", "4", "--ray",
                              "serve.ray_replicas=2", "serve.batch_timeout_ms=5"])
    assert (cfg.model_path, cfg.port, cfg.max_batch_size, cfg.ray_replicas, cfg.batch_timeout_ms) == \
        ("runs/x", 9001, 4, 2, 5.0)
    assert cfg.backend == ServeBackend.ray and cfg.host == "127.0.0.1"
    with pytest.raises(ValueError, match="serve.<field>=<value>"):
        parse_serve_config(["runs/x", "max_batch_size=3"])
    with pytest.raises(ValueError, match="bad override"):
        parse_serve_config(["runs/x", "serve.max_batch_sise=3"])
    with pytest.raises(ValueError, match="serve.max_batch_size=0"):
        parse_serve_config(["runs/x", "--max-batch-size", "0"])
    with pytest.raises(ValueError, match="serve.backend"):
        parse_serve_config(["runs/x", "serve.backend=k8s"])


# --- 503 / 504 through the real server ---
def test_full_queue_is_503_and_timeout_is_504_then_the_server_recovers(tmp_path, monkeypatch):
    gate = threading.Event()
    real = app_mod.make_batch_runner

    def gated(lm):
        run = real(lm)
        return lambda *a: (gate.wait(30), run(*a))[1]

    monkeypatch.setattr(app_mod, "make_batch_runner", gated)
    cfg = ServeConfig(model_path=str(write_tiny_checkpoint(tmp_path)), max_batch_size=1, batch_timeout_ms=0,
                      max_queue=1, request_timeout_s=1.0, device="cpu")
    with BackgroundServer(app_mod.create_app(cfg)) as srv:
        url, body = f"{srv.base_url}/v1/completions", {"model": "run/step-00000002", "prompt": "a", "max_tokens": 2}
        with httpx.Client(timeout=30) as http:
            first = threading.Thread(target=http.post, args=(url,), kwargs={"json": body})
            first.start()  # taken by the worker, which waits at the gate
            while httpx.get(f"{srv.base_url}/health").json()["batches"] < 1:
                time.sleep(0.01)
            second = threading.Thread(target=http.post, args=(url,), kwargs={"json": body})
            second.start()  # waits in the queue (size 1)
            while httpx.get(f"{srv.base_url}/health").json()["queued"] < 1:
                time.sleep(0.01)
            r = http.post(url, json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
            first.join(), second.join()  # both time out after 1 s: 504
            r = http.post(url, json=body)
            assert r.status_code == 504 and "request_timeout_s" in r.json()["error"]["message"]
            gate.set()
            client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0)
            ok = client.completions.create(model="run/step-00000002", prompt="b", max_tokens=2, temperature=0)
            assert ok.choices[0].finish_reason in ("stop", "length")


# --- the real command ---
def test_dist_llm_serve_command_serves_on_localhost(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    ckpt = write_tiny_checkpoint(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dist_llm.cli.main", "serve", str(ckpt.parents[1]), "--port",
                             str(port), "--device", "cpu", "--log-level", "warning", "serve.max_batch_size=4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        end = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < end, proc.communicate(timeout=5)[0][-3000:]
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert client.models.list().data[0].id == "run"
        r = client.completions.create(model="run", prompt="hello", max_tokens=3, temperature=0)
        assert 1 <= r.usage.completion_tokens <= 3
    finally:
        proc.terminate()
        proc.wait(30)
    bad = subprocess.run([sys.executable, "-m", "dist_llm.cli.main", "serve", str(ckpt), "--port", "70000"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "serve.port=70000" in bad.stderr
