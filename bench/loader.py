"""Loader headroom: samples/s the TrainLoader delivers (0, 1, 2 workers) versus samples/s the
trainer consumes, at the demo's batch (16 x 128, micro 8) and at a 4x larger one (64 x 128).

    python -m bench.loader [--steps 300] [--train-steps 20]

The loader is timed alone (``next_step`` in a loop, first 5 calls dropped: worker start-up); the
trainer's rate comes from a short run of our trainer at 1 rank (ZeRO-0) on the same batch.
Headroom = delivered / consumed. Writes bench/results/loader.json.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Dict

from bench._loops import compose_cfg, ours, run_ranks, steady_tokens_per_s, write_result

BATCHES = {"demo": (16, 8), "4x": (64, 32)}  # global, micro


def _cfg(job: Dict, name: str, gb: int, mb: int, workers: int = 0):
    return compose_cfg(["parallel=zero0", f"name={name}", "train.seq_len=128", f"train.global_batch_size={gb}",
                        f"train.micro_batch_size={mb}", f"train.max_steps={job['train_steps']}",
                        f"data.num_workers={workers}", "data.embedded_max_bytes=2000000"], Path(job["workdir"]))


def loader_job(job: Dict, rank: int, world: int) -> Dict:
    from dist_llm.data import TrainLoader
    from dist_llm.launch.env import read_launch_env

    out: Dict[str, Dict] = {}
    for label, (gb, mb) in BATCHES.items():
        row: Dict = {"global_batch": gb}
        for workers in (0, 1, 2):
            cfg = _cfg(job, f"l{label}{workers}", gb, mb, workers)
            loader = TrainLoader.from_config(cfg.data, cfg.train, 0, 1, gb // mb)
            for _ in range(5):
                loader.next_step()
            t0 = time.perf_counter()
            for _ in range(job["steps"]):
                loader.next_step()
            row[f"loader_w{workers}"] = job["steps"] * gb / (time.perf_counter() - t0)
            loader.close()
        cfg = _cfg(job, f"t{label}", gb, mb)
        t0 = time.perf_counter()
        ends = ours(cfg, read_launch_env())
        row["trainer"] = steady_tokens_per_s(ends, t0, gb, 5)  # samples per step: rate in samples/s
        out[label] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--train-steps", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        res = run_ranks(1, {"steps": args.steps, "train_steps": args.train_steps, "workdir": d}, "bench.loader:loader_job")
    print(f"{'batch':<6} {'trainer smp/s':>13} " + " ".join(f"{f'w={w} smp/s':>11} {'headroom':>8}" for w in (0, 1, 2)))
    for label, r in res.items():
        cells = " ".join(f"{r[f'loader_w{w}']:>11.0f} {r[f'loader_w{w}'] / r['trainer']:>7.0f}x" for w in (0, 1, 2))
        print(f"{label:<6} {r['trainer']:>13.1f} {cells}")
    print(f"results: {write_result('loader', {'args': vars(args), 'rows': res})}")


if __name__ == "__main__":
    main()
