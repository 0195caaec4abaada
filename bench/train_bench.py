"""Training throughput of the DeepSpeed engine on the CPU mock cluster, ZeRO 0-3 side by side.

Runs the real CLI (`dist-llm train`) once per configuration in one invocation of this script,
on the demo model (4 layers, width 128, seq 128, global batch 16), and prints the median
tokens/s, step time and MFU over the steps after warm-up, plus the data loader's own time per
step (to show it is not the bottleneck).

    .venv/bin/python bench/train_bench.py [--steps 40] [--nproc 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = ["model=demo", "train=demo", "train.eval_every=0", "train.checkpoint.every=0", "train.checkpoint.save_at_end=false",
          "train.sample.tokens=0", "logging=none", "train.ui.progress_bar=off", "data.embedded_max_bytes=1000000"]


def run(workdir: Path, name: str, overrides: list[str], steps: int) -> dict:
    cmd = [sys.executable, "-m", "dist_llm.cli.main", "train", *COMMON, f"name={name}",
           f"train.max_steps={steps}", "train.log_every=1", *overrides]
    subprocess.run(cmd, cwd=workdir, check=True, capture_output=True, text=True)
    recs = [json.loads(x) for x in (workdir / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "step_time_s" in r][5:]  # drop warm-up steps
    med = lambda k: statistics.median(r[k] for r in recs if k in r)  # noqa: E731
    return {"tokens_per_s": med("tokens_per_s"), "step_time_s": med("step_time_s"),
            "mfu": med("perf/mfu") if any("perf/mfu" in r for r in recs) else float("nan"), "steps": len(recs)}


def loader_time(workdir: Path, nproc: int) -> tuple[float, float]:
    """Median and mean seconds per `next_step()` of one rank's loader (the mean includes the
    steps that open a new shard)."""
    from dist_llm.data import TrainLoader

    split = workdir / "data" / "stdlib" / "train"
    loader = TrainLoader([(str(split), 1.0)], 128, 2, 0, nproc, 8, 16 // (8 * nproc), 1234)
    times = []
    for _ in range(500):
        t0 = time.perf_counter()
        loader.next_step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.fmean(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        workdir = Path(d)
        rows = {}
        for stage in (0, 1, 2, 3):
            rows[f"zero{stage} x{args.nproc}"] = run(workdir, f"z{stage}", [f"parallel=zero{stage}",
                                                     f"launcher.nproc={args.nproc}"], args.steps)
        rows["zero0 x1"] = run(workdir, "one", ["parallel=zero0", "launcher.nproc=1"], args.steps)
        lt = loader_time(workdir, args.nproc)
    base = rows[f"zero0 x{args.nproc}"]["tokens_per_s"]
    print(f"{'config':<12} {'tokens/s':>10} {'step ms':>9} {'MFU':>6} {'vs zero0':>9}")
    for name, r in rows.items():
        print(f"{name:<12} {r['tokens_per_s']:>10.0f} {1000 * r['step_time_s']:>9.1f} {r['mfu']:>6.2f} "
              f"{r['tokens_per_s'] / base:>8.2f}x")
    print(f"data loader: {1000 * lt[0]:.3f} ms median, {1000 * lt[1]:.3f} ms mean per step per rank (500 steps)")


if __name__ == "__main__":
    main()
