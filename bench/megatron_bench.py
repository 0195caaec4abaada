"""Tokens/s of the Megatron engine on the CPU mock cluster (or GPUs), through the real CLI.

    python bench/megatron_bench.py [--steps 30] [--warmup 5] [--d-model 256] [--layers 4]

Each layout trains the same model and global batch for ``--steps`` steps in a scratch
directory; the figure is the median of the per-step ``tokens_per_s`` after ``--warmup`` steps
(from runs/<name>/metrics.jsonl). On CPU, tensor parallelism is expected to be *slower* than
one rank: every layer does small gloo all-reduces and the ranks share the same cores. The point
of the CPU figures is that every layout runs (and tests show it computes the same numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = [  # (label, CLI overrides)
    ("deepspeed zero1, 1 rank", ["parallel=zero1", "launcher.nproc=1"]),
    ("megatron tp=1 pp=1, 1 rank", ["parallel=megatron", "launcher.nproc=1"]),
    ("megatron tp=1 pp=1 dp=2", ["parallel=megatron", "launcher.nproc=2"]),
    ("megatron tp=2", ["parallel=tp2", "launcher.nproc=2"]),
    ("megatron tp=2 sp", ["parallel=tp2_sp", "launcher.nproc=2"]),
    ("megatron pp=2 (1F1B)", ["parallel=pp2", "launcher.nproc=2"]),
    ("megatron tp=2 pp=2", ["parallel=tp2_pp2", "launcher.nproc=4"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--only", nargs="*", help="substrings of layout labels to run")
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, over) in enumerate(LAYOUTS):
            if a.only and not any(s in label for s in a.only):
                continue
            args = ["train", f"name=bench{i}", "data.embedded_max_bytes=300000", "logging=none",
                    "train.ui.progress_bar=off", f"train.max_steps={a.steps}", "train.eval_every=0",
                    "train.checkpoint.save_at_end=false", f"model.d_model={a.d_model}", f"model.n_layers={a.layers}",
                    f"train.micro_batch_size={a.micro_batch}", f"train.global_batch_size={a.global_batch}",
                    "data.lanes=2", "train.ui.peak_flops=1", *over]
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "dist_llm.cli.main", *args], cwd=tmp, env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                print(f"{label}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            recs = [json.loads(l) for l in (Path(tmp) / "runs" / f"bench{i}" / "metrics.jsonl").read_text().splitlines()]
            tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][a.warmup:]
            loss = [r["train/loss"] for r in recs if "train/loss" in r][-1]
            rows.append((label, statistics.median(tps), loss, time.time() - t0))
            print(f"{label:32s} {rows[-1][1]:10.0f} tokens/s   final loss {loss:.4f}   ({rows[-1][3]:.0f} s wall)",
                  flush=True)
    print(f"\nmodel d_model={a.d_model} layers={a.layers}, global batch {a.global_batch} x seq 32, "
          f"median over steps {a.warmup + 1}..{a.steps}, cpu_count={os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
