"""Serving throughput: 16 concurrent requests, dynamic batching vs the same requests one at a time.

Two real uvicorn servers over the same random-weight GPT checkpoint (written as a dist-llm
checkpoint, byte tokenizer), each hit by the same 16 concurrent `openai` clients asking for
greedy completions: one batches up to 16 requests per `generate_batch` call
(``max_batch_size=16``), the other runs each request alone (``max_batch_size=1``). Both
produce the same tokens; the figure is the ratio of generated tokens per second (issue target:
>= 2x). Each side runs ``--repeats`` times (after one warm-up round) and the median is kept.

    PYTHONPATH=. .venv/bin/python -m bench.serve [--requests 16] [--max-tokens 64] [--out bench/serve.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dist_llm.config.serve_schema import ServeConfig  # noqa: E402
from dist_llm.serve.app import create_app  # noqa: E402
from dist_llm.serve.model_loader import load_for_serving  # noqa: E402
from dist_llm.serve.server import BackgroundServer  # noqa: E402

MODEL = dict(n_layers=4, n_heads=8, d_model=256, max_seq_len=256)
# long enough for 16 clients started together to land in one batch (their requests arrive over
# a few ms); a batch does not take newcomers once it runs
BATCH_TIMEOUT_MS = 50


def one_round(base_url: str, model: str, prompts, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=600)

    def ask(p):
        t0 = time.perf_counter()
        r = client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0)
        return r, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(ask, prompts))
    wall = time.perf_counter() - t0
    tokens = sum(r.usage.completion_tokens for r, _ in outs)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "mean_latency_s": statistics.mean(lat for _, lat in outs), "texts": [r.choices[0].text for r, _ in outs]}


def measure(ckpt: Path, batch: int, prompts, max_tokens: int, repeats: int, device: str) -> dict:
    cfg = ServeConfig(model_path=str(ckpt), max_batch_size=batch, batch_timeout_ms=BATCH_TIMEOUT_MS, max_queue=64,
                      max_tokens_limit=max_tokens, device=device)
    lm = load_for_serving(cfg)
    with BackgroundServer(create_app(cfg, loaded=lm)) as srv:
        one_round(srv.base_url, lm.name, prompts[:2], 4)  # warm-up
        rounds = [one_round(srv.base_url, lm.name, prompts, max_tokens) for _ in range(repeats)]
        import httpx

        health = httpx.get(f"{srv.base_url}/health").json()
    best = sorted(rounds, key=lambda r: r["tokens_per_s"])[len(rounds) // 2]
    return {"max_batch_size": batch, **{k: v for k, v in best.items() if k != "texts"},
            "all_tokens_per_s": [round(r["tokens_per_s"], 2) for r in rounds],
            "max_batch_seen": health["max_batch_seen"], "texts": best["texts"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "bench" / "serve.json"))
    args = ap.parse_args(argv)

    import torch

    from serve_helpers import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp), **MODEL)
        prompts = [f"def function_{i}(x, y):\n    return " for i in range(args.requests)]
        one = measure(ckpt, 1, prompts, args.max_tokens, args.repeats, args.device)
        batched = measure(ckpt, args.requests, prompts, args.max_tokens, args.repeats, args.device)
    same = one.pop("texts") == batched.pop("texts")
    ratio = batched["tokens_per_s"] / one["tokens_per_s"]
    print(f"\n{args.requests} concurrent requests x {args.max_tokens} new tokens (greedy), model {MODEL}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'server':<28}{'wall s':>9}{'tokens':>8}{'tok/s':>10}{'mean latency s':>16}{'max batch':>11}")
    for label, r in (("one at a time (batch 1)", one), (f"dynamic batching ({args.requests})", batched)):
        print(f"{label:<28}{r['wall_s']:>9.2f}{r['tokens']:>8}{r['tokens_per_s']:>10.1f}"
              f"{r['mean_latency_s']:>16.2f}{r['max_batch_seen']:>11}")
    print(f"throughput ratio (batched / one at a time): {ratio:.2f}x   same texts: {same}")
    result = {"requests": args.requests, "max_new_tokens": args.max_tokens, "model": MODEL,
              "torch_threads": torch.get_num_threads(), "one_at_a_time": one, "batched": batched,
              "throughput_ratio": ratio, "same_texts": same, "provisional": "shared 2-core CPU machine"}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
