"""Peak memory per rank for ZeRO 0/1/2/3 and ZeRO-2 + CPU optimizer offload, beside theory.

    python -m bench.memory [--ranks 2] [--layers 12] [--width 512] [--steps 3]

A GPT of ~40M parameters (12 layers, width 512, 320-token vocabulary) in fp32 at a tiny batch
(2 x 64 per rank, one micro-batch of 1 twice), so weights, gradients and Adam state dominate. Each rank samples its RSS
(psutil, every 5 ms)
from just before the model is built (after gc + malloc_trim) to the end of the steps: "peak" is
the max minus that baseline (imports, process group and loader excluded); "resident" is the RSS
after each step (gc + malloc_trim; gradients already freed) minus the baseline.

Theory columns (buffers and activations excluded): the ZeRO paper's count with fp32 Adam
(16, 8+8/N, 4+12/N, 16/N) and DeepSpeed's fp32 layout, which clones an fp32 master partition
and keeps its gradient (16, 8+16/N, 4+16/N, 20/N). Offload on a CPU mock cluster is host RSS: as
ZeRO-2. Writes bench/results/memory.json.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict

from bench._loops import compose_cfg, ours, run_ranks, write_result

CONFIGS = {"zero0": ["parallel=zero0"], "zero1": ["parallel=zero1"], "zero2": ["parallel=zero2"],
           "zero3": ["parallel=zero3"], "zero2_offload": ["parallel=zero2", "parallel.offload_optimizer=true"]}


def theory_bytes_per_param(name: str, n: int) -> float:
    """The ZeRO paper's model-state count with fp32 Adam (weights double as the master copy:
    weights 4, grads 4, m+v 8 bytes/param), buffers and activations excluded."""
    return {"zero0": 16.0, "zero1": 8 + 8 / n, "zero2": 4 + 12 / n, "zero3": 16 / n,
            "zero2_offload": 4 + 12 / n}[name]


def deepspeed_bytes_per_param(name: str, n: int) -> float:
    """The same count for DeepSpeed's fp32 layout: from ZeRO-1 on it clones an fp32 master
    partition (4/N) beside the module's weights and keeps that partition's own gradient (4/N);
    ZeRO-0 steps torch's AdamW on the module directly (no clone). Buckets excluded."""
    return {"zero0": 16.0, "zero1": 8 + 16 / n, "zero2": 4 + 16 / n, "zero3": 20 / n,
            "zero2_offload": 4 + 16 / n}[name]


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc), so RSS shows what is alive, not what was."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class RssPeak:
    def __init__(self, every_s: float = 0.005):
        import psutil

        self.proc, self.every_s, self.peak, self._stop = psutil.Process(), every_s, 0, threading.Event()
        self.baseline = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every_s)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return max(self.peak, self.proc.memory_info().rss) - self.baseline


def memory_job(job: Dict, rank: int, world: int) -> Dict:
    import gc

    import torch.distributed as dist

    import dist_llm.models as models_mod
    import dist_llm.train.callbacks as cb_mod
    from dist_llm.launch.env import read_launch_env

    cfg = compose_cfg([*job["overrides"], "name=mem", f"train.max_steps={job['steps']}", "train.micro_batch_size=1",
                       f"train.global_batch_size={2 * world}", f"model.n_layers={job['layers']}",
                       f"model.d_model={job['width']}", "model.n_heads=8"], Path(job["workdir"]))
    import deepspeed  # noqa: F401  (imported before the baseline: its import is not training memory)

    gc.collect()
    box: Dict = {}
    orig = models_mod.build_model

    def build_and_start(model_cfg):  # the baseline is taken right before the weights exist
        box["rss"] = RssPeak()
        model = orig(model_cfg)
        box["params"] = sum(p.numel() for p in model.parameters())
        return model

    orig_end = cb_mod.MetricsCallback.on_step_end
    resident = []

    def resident_after_step(self, trainer, stats, step_time_s):  # model states alive, temporaries freed
        orig_end(self, trainer, stats, step_time_s)
        _trim_heap()
        resident.append(box["rss"].proc.memory_info().rss - box["rss"].baseline)

    _trim_heap()
    models_mod.build_model = build_and_start
    cb_mod.MetricsCallback.on_step_end = resident_after_step
    try:
        ours(cfg, read_launch_env())
    finally:
        models_mod.build_model = orig
        cb_mod.MetricsCallback.on_step_end = orig_end
    peak = box["rss"].stop()
    mine = (peak, max(resident))
    per_rank = [None] * world
    dist.all_gather_object(per_rank, mine) if world > 1 else per_rank.__setitem__(0, mine)
    return {"params": box["params"], "peak_bytes": [p for p, _ in per_rank],
            "resident_bytes": [r for _, r in per_rank]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = ap.parse_args()
    # Large tensors straight from mmap, so a freed one leaves RSS at once (glibc's default
    # threshold grows past the size of our weight matrices after the first frees and then keeps
    # freed matrices in the heap, where RSS counts them long after). Inherited by the spawned ranks.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.configs:
            r = run_ranks(args.ranks, {"overrides": CONFIGS[name], "steps": args.steps, "layers": args.layers,
                                       "width": args.width, "workdir": str(Path(d) / name)}, "bench.memory:memory_job")
            psi, n = r["params"], args.ranks
            rows.append({"config": name, "params": psi, "peak_bytes_per_rank": r["peak_bytes"],
                         "resident_bytes_per_rank": r["resident_bytes"],
                         "peak_bytes_per_param": max(r["peak_bytes"]) / psi,
                         "resident_bytes_per_param": max(r["resident_bytes"]) / psi,
                         "theory_bytes_per_param": theory_bytes_per_param(name, n),
                         "deepspeed_theory_bytes_per_param": deepspeed_bytes_per_param(name, n)})
    print(f"{'config':<14} {'params':>9} {'peakMB':>7} {'peak B/p':>8} {'resid B/p':>9} {'paper':>6} "
          f"{'DS':>6} {'resid/paper':>11} {'resid/DS':>8} {'peak/DS':>7}")
    for r in rows:
        res, th, ds = r["resident_bytes_per_param"], r["theory_bytes_per_param"], r["deepspeed_theory_bytes_per_param"]
        print(f"{r['config']:<14} {r['params']:>9} {max(r['peak_bytes_per_rank']) / 2**20:>7.0f} "
              f"{r['peak_bytes_per_param']:>8.2f} {res:>9.2f} {th:>6.2f} {ds:>6.2f} {res / th:>11.2f} "
              f"{res / ds:>8.2f} {r['peak_bytes_per_param'] / ds:>7.2f}")
    print(f"results: {write_result('memory', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
