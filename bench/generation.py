"""Generation speed: the KV cache against recomputing the prefix at every step.

For each preset (gpt2: learned positions; llama: RoPE with grouped-query attention) and batch
size, generates ``--new-tokens`` tokens (default 256) with ``generate_batch(use_cache=True)``
and with ``use_cache=False`` (every step re-runs the whole padded sequence), asserts that both
produce the same tokens (seeded top-k sampling, so a wrong cache would show), and prints the
wall time, tokens/s and the speed-up. Batches of more than one row use prompts of different
lengths, so left padding is exercised too. Results go to ``bench/results/generation.json``.

    PYTHONPATH=$PWD .venv/bin/python -m bench.generation [--new-tokens 256] [--out PATH]

The model is randomly initialised (speed does not depend on the weights): 4 layers, width 256,
8 heads, vocabulary 8192, context 512. On a shared CPU the figures are noisy; the ratio is the
figure to read.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from dist_llm.config.schema import ModelConfig
from dist_llm.models import GPT, SamplingParams, generate_batch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "generation.json"


def bench_model(preset: str, args: argparse.Namespace) -> GPT:
    cfg = ModelConfig(preset=preset, n_layers=args.layers, n_heads=8, n_kv_heads=2 if preset == "llama" else None,
                      d_model=args.d_model, max_seq_len=512, vocab_size=8192, init_std=0.3)
    torch.manual_seed(0)
    return GPT(cfg).eval()


def prompts_for(batch: int, prompt_len: int) -> list:
    gen = torch.Generator().manual_seed(batch)
    lengths = [max(1, prompt_len - 8 * i) for i in range(batch)]  # different lengths: left padding
    return [torch.randint(0, 8192, (n,), generator=gen).tolist() for n in lengths]


def timed(model: GPT, prompts: list, params: SamplingParams, use_cache: bool) -> tuple:
    start = time.perf_counter()
    results = generate_batch(model, prompts, params, use_cache=use_cache)
    return time.perf_counter() - start, [r.token_ids for r in results]


def run_case(preset: str, batch: int, args: argparse.Namespace) -> dict:
    model = bench_model(preset, args)
    prompts = prompts_for(batch, args.prompt_len)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, top_k=50, seed=1234)
    warm = SamplingParams(max_new_tokens=4, temperature=1.0, top_k=50, seed=1)
    timed(model, prompts, warm, True), timed(model, prompts, warm, False)  # warm-up (allocator, kernels)
    cached_s, cached_tokens = min((timed(model, prompts, params, True) for _ in range(args.repeats)),
                                  key=lambda r: r[0])
    recompute_s, recompute_tokens = min((timed(model, prompts, params, False) for _ in range(args.repeats)),
                                        key=lambda r: r[0])
    if cached_tokens != recompute_tokens:
        raise AssertionError(f"{preset} batch {batch}: the KV cache changed the generated tokens")
    new = sum(len(t) for t in cached_tokens)
    row = {"preset": preset, "batch": batch, "prompt_lengths": [len(p) for p in prompts],
           "new_tokens_per_row": args.new_tokens, "same_tokens": True,
           "cached_s": round(cached_s, 3), "recompute_s": round(recompute_s, 3),
           "cached_tokens_per_s": round(new / cached_s, 1), "recompute_tokens_per_s": round(new / recompute_s, 1),
           "speedup": round(recompute_s / cached_s, 2)}
    print(f"{preset:6s} batch {batch}: kv cache {cached_s:7.2f} s ({row['cached_tokens_per_s']:8.1f} tok/s)   "
          f"recompute {recompute_s:7.2f} s ({row['recompute_tokens_per_s']:8.1f} tok/s)   "
          f"speed-up {row['speedup']:.1f}x   same tokens", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--presets", nargs="+", default=["gpt2", "llama"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="best of N timings per mode")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: steadier figures on a shared machine; 0 = torch's default)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = [run_case(preset, batch, args) for preset in args.presets for batch in args.batches]
    result = {"bench": "generation", "rows": rows, "min_speedup": min(r["speedup"] for r in rows),
              "model": {"layers": args.layers, "d_model": args.d_model, "heads": 8, "vocab": 8192},
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "device": "cpu"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"generation_kv_cache_speedup_min {result['min_speedup']}  (written to {args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
