"""Our trainer versus a minimal hand-written loop, side by side, alternating.

    python -m bench.overhead [--pairs 5] [--steps 30] [--warmup 8] [--ranks 1 2] [--configs zero0 ...]
    python -m bench.overhead --quick     # ZeRO-0 only, 1 and 2 ranks, 3 pairs of 16 steps (~2 min)

For each configuration (ZeRO 0/1/2/3 and the Megatron engine at tp=1, at 1 and 2 ranks) one
process group runs ``--pairs`` pairs of (plain loop, our trainer) — the order flips every pair —
on the demo model (4 layers, width 128) at 12 x 64 tokens per rank. The ratio ours/plain of
steady-state tokens/s is reported as min/median/max over the pairs; ``step_ratio`` is the same
ratio from each run's median step time (robust to bursts of load from other jobs); ``steal%``
is the largest share of CPU time the hypervisor took from this VM during any one run (from
/proc/stat; a noisy neighbour shows there, not in the load average). A pair with more steal than
``--max-steal`` (default 5%) is measured again, up to ``--pairs`` extra times, and counted under
``rejected``. Writes
bench/results/overhead.json and ends with one line per configuration:
``overhead engine=deepspeed ranks=1 zero=0 ratio=0.981``.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Dict

from bench._loops import (compose_cfg, cpu_ticks, max_known, ours, plain_loop, run_ranks, stats,
                          steady_tokens_per_s, steal_percent, write_result)


def median_step_s(ends, warmup: int) -> float:
    """The median wall time of one step after warm-up."""
    import statistics

    return statistics.median(b - a for a, b in zip(ends[warmup:], ends[warmup + 1:]))

CONFIGS = {"zero0": ["parallel=zero0"], "zero1": ["parallel=zero1"], "zero2": ["parallel=zero2"],
           "zero3": ["parallel=zero3"], "megatron": ["parallel=megatron", "parallel.tp=1"]}


def pairs_job(job: Dict, rank: int, world: int) -> Dict:
    """``pairs`` pairs of (plain, ours), alternating. A pair during which the hypervisor took more
    than ``max_steal`` percent of the CPUs (rank 0's /proc/stat, agreed by every rank) is set
    aside and measured again, up to ``pairs`` extra attempts; the set-aside pairs stay in the
    JSON under ``rejected``."""
    out = {"plain": [], "ours": [], "ratio": [], "step_ratio": [], "steal_percent": [], "rejected": []}
    attempt = 0
    while len(out["ratio"]) < job["pairs"] and attempt < 2 * job["pairs"]:
        pair = _one_pair(job, world, attempt, plain_first=len(out["ratio"]) % 2 == 0)
        attempt += 1
        steal = max_known(pair["steal_percent"]) or 0.0
        if job.get("max_steal") and _agreed(steal > job["max_steal"], world) and attempt < 2 * job["pairs"]:
            out["rejected"].append(pair)
            continue
        for k in ("plain", "ours", "ratio", "step_ratio"):
            out[k].append(pair[k])
        out["steal_percent"].extend(pair["steal_percent"])
    return out


def _agreed(flag: bool, world: int) -> bool:
    """Rank 0's ``flag`` on every rank (each rank reads /proc/stat at a slightly different time)."""
    if world == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    dist.broadcast(t, src=0)
    return bool(t.item())


def _one_pair(job: Dict, world: int, i: int, plain_first: bool) -> Dict:
    """Pair ``i`` (its run directory); the kept pairs alternate which side runs first."""
    import time

    from dist_llm.launch.env import read_launch_env

    steps, warmup = job["steps"], job["warmup"]
    cfg = compose_cfg([*job["overrides"], f"name=p{i}", f"train.max_steps={steps}",
                       f"train.global_batch_size={12 * world}"], Path(job["workdir"]))
    tps = cfg.train.global_batch_size * cfg.train.seq_len
    rates, med, steal = {}, {}, []
    for side in (("plain", "ours") if plain_first else ("ours", "plain")):
        t0, ticks = time.perf_counter(), cpu_ticks()
        ends = plain_loop(cfg, steps, world) if side == "plain" else ours(cfg, read_launch_env())
        rates[side] = steady_tokens_per_s(ends, t0, tps, warmup)
        steal.append(steal_percent(ticks, cpu_ticks()))
        med[side] = median_step_s(ends, warmup)
    return {"plain": rates["plain"], "ours": rates["ours"], "ratio": rates["ours"] / rates["plain"],
            "step_ratio": med["plain"] / med["ours"], "steal_percent": steal}


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60, help="steps per run (50 measured after warm-up: 30 was noisy at 1 rank)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--quick", action="store_true", help="ZeRO-0 only, 3 pairs of 16 steps (warmup 4)")
    ap.add_argument("--max-steal", type=float, default=5.0,
                    help="measure a pair again when the hypervisor took more than this %% of the CPUs during it "
                         "(0 = keep every pair)")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.steps, args.warmup, args.configs = 3, 16, 4, ["zero0"]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for world in args.ranks:
            for name in args.configs:
                job = {"overrides": CONFIGS[name], "steps": args.steps, "warmup": args.warmup,
                       "pairs": args.pairs, "max_steal": args.max_steal, "workdir": str(Path(d) / f"{name}-{world}")}
                r = run_ranks(world, job, "bench.overhead:pairs_job")
                rows.append({"config": name, "ranks": world, "engine": "megatron" if name == "megatron" else "deepspeed",
                             "zero": None if name == "megatron" else int(name[-1]),
                             "ratio": stats(r["ratio"]), "step_ratio": stats(r["step_ratio"]),
                             "plain_tokens_per_s": stats(r["plain"]),
                             "ours_tokens_per_s": stats(r["ours"]),
                             "steal_percent_max": max_known(r["steal_percent"]),
                             "pairs_rejected": len(r["rejected"]),
                             "raw": r})
                print(f"done {name} ranks={world}: median ratio {rows[-1]['ratio']['median']:.3f}", flush=True)
    path = write_result("overhead", {"args": vars(args), "rows": rows})
    print(f"\n{'config':<10} {'ranks':>5} {'plain tok/s':>12} {'ours tok/s':>11} {'ratio min':>10} {'median':>7} "
          f"{'max':>6} {'step ratio':>11} {'steal% max':>10} {'rejected':>8}")
    for r in rows:
        q = r["ratio"]
        print(f"{r['config']:<10} {r['ranks']:>5} {r['plain_tokens_per_s']['median']:>12.0f} "
              f"{r['ours_tokens_per_s']['median']:>11.0f} {q['min']:>10.3f} {q['median']:>7.3f} {q['max']:>6.3f} "
              f"{r['step_ratio']['median']:>11.3f} {_pct(r['steal_percent_max']):>10} {r['pairs_rejected']:>8}")
    print(f"results: {path}")
    for r in rows:
        stage = "" if r["zero"] is None else f" zero={r['zero']}"
        tp = " tp=1" if r["engine"] == "megatron" else ""
        print(f"overhead engine={r['engine']} ranks={r['ranks']}{stage}{tp} ratio={r['ratio']['median']:.3f}")


if __name__ == "__main__":
    main()
