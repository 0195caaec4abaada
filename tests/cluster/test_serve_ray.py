"""`dist-llm serve --ray` against a real local Ray cluster (ray_jobs/start_local_cluster.sh: 127.0.0.1,
2 CPUs): the same FastAPI app deployed as 2 Ray Serve replicas answers the official `openai`
client (completions, streamed completions, chat), and both replicas take requests."""
from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_helpers import write_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_serve_two_replicas_answer_the_openai_client(ray_cluster, tmp_path, monkeypatch):
    for k, v in ray_cluster["env"].items():  # the cluster's token authentication, before Ray reads it
        if k.startswith("RAY_AUTH"):
            monkeypatch.setenv(k, v)
    try:
        from ray import serve  # noqa: F401
    except ImportError as e:
        pytest.skip(f"Ray Serve cannot be imported here ({e}): pip install 'ray[serve]'")
    import ray

    from dist_llm.config.serve_schema import ServeBackend, ServeConfig
    from dist_llm.serve import ray_backend

    ckpt = write_tiny_checkpoint(tmp_path)
    port = _free_port()
    cfg = ServeConfig(model_path=str(ckpt), backend=ServeBackend.ray, ray_address=ray_cluster["address"],
                      ray_replicas=2, ray_cpus_per_replica=0.5, port=port, device="cpu")
    try:
        ray_backend.deploy(cfg)
        base = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
        (model,) = client.models.list().data
        assert model.id == "run/step-00000002"
        kw = dict(model=model.id, prompt="def f(", max_tokens=12, temperature=0)
        text = client.completions.create(**kw).choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        assert text and streamed == text
        chat = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=6, temperature=0)
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
        pids, end = set(), time.time() + 60
        while len(pids) < 2 and time.time() < end:  # requests spread over both replicas
            pids.add(httpx.get(f"{base}/health", timeout=30).json()["pid"])
        assert len(pids) == 2
        # every replica gives the same greedy answer (same checkpoint)
        assert {client.completions.create(**kw).choices[0].text for _ in range(6)} == {text}
    finally:
        if ray.is_initialized():
            try:
                ray_backend.shutdown()
            finally:
                ray.shutdown()
