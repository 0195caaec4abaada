"""Weak scaling of our trainer on the CPU mock cluster: tokens/s at 1, 2 and 4 ranks with the
same per-rank batch (12 x 64 tokens, demo model, ZeRO-0 unless --parallel says otherwise).

    python -m bench.scaling [--ranks 1 2 4] [--steps 30] [--warmup 8] [--parallel zero0]

On a 2-core machine 4 ranks oversubscribe the cores (one thread each): the figure then shows the
cost of the mock cluster, not of the algorithm. Writes bench/results/scaling.json.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Dict

from bench._loops import compose_cfg, ours, run_ranks, steady_tokens_per_s, write_result


def scaling_job(job: Dict, rank: int, world: int) -> Dict:
    from dist_llm.launch.env import read_launch_env

    cfg = compose_cfg([f"parallel={job['parallel']}", "name=scale", f"train.max_steps={job['steps']}",
                       f"train.global_batch_size={12 * world}",
                       "data.lanes=4"], Path(job["workdir"]))
    t0 = time.perf_counter()
    ends = ours(cfg, read_launch_env())
    return {"tokens_per_s": steady_tokens_per_s(ends, t0, cfg.train.global_batch_size * cfg.train.seq_len,
                                                job["warmup"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--parallel", default="zero0")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for world in args.ranks:
            r = run_ranks(world, {"parallel": args.parallel, "steps": args.steps, "warmup": args.warmup,
                                  "workdir": str(Path(d) / str(world))}, "bench.scaling:scaling_job")
            rows.append({"ranks": world, "tokens_per_s": r["tokens_per_s"]})
    base = rows[0]["tokens_per_s"] / rows[0]["ranks"]
    print(f"{'ranks':>5} {'tokens/s':>10} {'per rank':>9} {'efficiency':>10}")
    for r in rows:
        r["efficiency"] = r["tokens_per_s"] / (base * r["ranks"])
        print(f"{r['ranks']:>5} {r['tokens_per_s']:>10.0f} {r['tokens_per_s'] / r['ranks']:>9.0f} {r['efficiency']:>10.2f}")
    print(f"results: {write_result('scaling', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
