"""Memory per rank for ZeRO 0/1/2/3 and ZeRO-2 + CPU optimizer offload, beside theory.

    python -m bench.memory [--ranks 4 [2 ...]] [--layers 12] [--width 512] [--small-width 128]

What is measured (CPU RSS of each rank, fp32, tiny batch so model states dominate):
- baseline: RSS right before ``build_model`` (after gc + malloc_trim), per run;
- *states*: RSS minus baseline after each micro-batch's backward (DeepSpeed's gradient
  reduction included) and right before the optimizer step (gc + malloc_trim first), max over
  those points in steps 2.. (Adam's m and v exist from the first step on): weights + gradients +
  optimizer state, what the theory counts. Two micro-batches per step (``--accum 2``),
  so ZeRO-1 holds full gradients between them (at one micro-batch DeepSpeed's ZeRO-1 reduces
  and frees them during the boundary backward, like ZeRO-2);
- *peak*: max RSS sampled every 5 ms from the baseline to the end, minus baseline, with the
  phase it fell in (init = engine start, forward, backward, optimizer_step).
Every figure is taken for two models with the same 12 layers and tensors and different widths
(``--width`` and ``--small-width``), in the same ranks (a warm-up run first, so one-time costs
(first-use allocations) are in the baseline): bytes/param =
(RSS_big - RSS_small) / (params_big - params_small), the slope of memory in the parameter count,
which is what the theory's bytes/param are and which cancels fixed costs (engine objects,
communicator buffers, per-tensor bookkeeping). The raw big-model figure / params is shown too.

DeepSpeed's buckets are bounded through ``parallel.zero.*`` (``--bucket`` elements, default
1/64 of the big model): at DeepSpeed's 5e8-element defaults a bucket spans the whole model.

Theory columns (bytes/param at the states point, buffers and activations excluded):
- paper: the ZeRO paper's count with fp32 Adam (weights double as master; 4 + 4 + 8):
  16, 8 + 8/N, 4 + 12/N, 16/N; offload as ZeRO-2 (host RSS on a CPU mock cluster);
- DS: DeepSpeed's fp32 layout, which from ZeRO-1 on clones an fp32 master partition (4/N):
  16, 8 + 12/N, 4 + 16/N, 20/N; offload keeps the master partition's gradient: 4 + 20/N.
``--precision bf16``: mixed precision, against the paper's K = 12 count (2 + 2 + 12, 4 + 12/N,
2 + 14/N, 16/N). Writes bench/results/memory.json (bf16: memory_bf16.json).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from bench._loops import compose_cfg, ours, run_ranks, write_result

CONFIGS = {"zero0": ["parallel=zero0"], "zero1": ["parallel=zero1"], "zero2": ["parallel=zero2"],
           "zero3": ["parallel=zero3"], "zero2_offload": ["parallel=zero2", "parallel.offload_optimizer=true"]}
PHASES = ("init", "forward", "backward", "all_reduce:loss+nonfinite", "optimizer_step")


def theory_bytes_per_param(name: str, n: int, precision: str = "fp32") -> float:
    """The ZeRO paper's model-state count, buffers and activations excluded. fp32 Adam: the
    weights double as the master copy (weights 4, grads 4, m+v 8 bytes/param). Mixed precision
    (bf16): 2-byte weights and grads plus K = 12 bytes of optimizer state (fp32 master 4, m+v 8):
    the paper's 2 + 2 + 12, (2 + 2) + 12/N, 2 + 14/N, 16/N."""
    if precision == "bf16":
        return {"zero0": 16.0, "zero1": 4 + 12 / n, "zero2": 2 + 14 / n, "zero3": 16 / n,
                "zero2_offload": 2 + 14 / n}[name]
    return {"zero0": 16.0, "zero1": 8 + 8 / n, "zero2": 4 + 12 / n, "zero3": 16 / n,
            "zero2_offload": 4 + 12 / n}[name]


def deepspeed_bytes_per_param(name: str, n: int, precision: str = "fp32") -> Optional[float]:
    """The same count for DeepSpeed's fp32 layout after backward, before the step: from ZeRO-1 on
    it clones an fp32 master partition (4/N) beside the module's weights (ZeRO-3: beside the
    weight partition); ZeRO-0 steps torch's AdamW on the module directly (no clone). With
    offload the master partition's gradient (4/N) is allocated once and kept
    (``initialize_optimizer_states`` in DeepSpeed's stage_1_and_2.py)."""
    if precision == "bf16":  # the master is part of the paper's K = 12: no separate layout derived
        return None
    return {"zero0": 16.0, "zero1": 8 + 12 / n, "zero2": 4 + 16 / n, "zero3": 20 / n,
            "zero2_offload": 4 + 20 / n}[name]


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc), so RSS shows what is alive, not what was."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class RssProbe:
    """RSS minus a baseline taken at construction: the max per phase (sampled every ``every_s``)
    and the states-point readings."""

    def __init__(self, every_s: float = 0.005):
        import psutil

        self.proc, self.every_s, self._stop = psutil.Process(), every_s, threading.Event()
        self.phase, self.peaks, self.states = "init", {}, []
        self.baseline = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def now(self) -> int:
        return self.proc.memory_info().rss - self.baseline

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every_s)

    def _sample(self) -> None:
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.now())

    def enter(self, phase: str) -> None:
        self._sample()  # the end of the phase that is closing
        self.phase = phase

    def stop(self) -> None:
        self._stop.set()
        self._t.join()
        self._sample()


def _as_method(bound):
    return lambda engine, *args: bound(engine, *args)


class _Hooks:
    """Wraps the model build, the engine's step and its phase hooks to read the probe at the
    baseline, the states points and after each step; ``patched()`` installs them for one run."""

    def __init__(self):
        import dist_llm.models as models_mod
        import dist_llm.parallel.deepspeed_engine as dse
        import dist_llm.parallel.engine as engine_mod

        self.targets = [(models_mod, "build_model"), (dse.DeepSpeedEngine, "train_step"),
                        (engine_mod.Engine, "hook_phase"), (engine_mod.Engine, "hook_after_backward")]
        self.orig = {name: getattr(obj, name) for obj, name in self.targets}
        self.probe, self.params, self.steps, self.resident, self.master = None, 0, 0, [], 0

    def build_model(self, model_cfg):  # the baseline is taken right before the weights exist
        self.probe = RssProbe()
        model = self.orig["build_model"](model_cfg)
        self.params = sum(p.numel() for p in model.parameters())
        return model

    def states_point(self, where: str) -> None:
        if self.steps >= 1:  # from step 2 on: Adam's m and v exist
            _trim_heap()
            self.probe.states.append((self.probe.now(), where))

    def hook_phase(self, engine, name):
        self.orig["hook_phase"](engine, name)
        if name == "optimizer_step":
            self.states_point(name)
            self.master = master_bytes(engine.optimizer)
        self.probe.enter(name)

    def hook_after_backward(self, engine, last):
        self.orig["hook_after_backward"](engine, last)
        self.states_point("after_last_backward" if last else "after_backward")

    def train_step(self, engine, micro_batches, lr):
        self.probe.enter("forward")
        out = self.orig["train_step"](engine, micro_batches, lr)
        if self.steps >= 1:  # after the step (gradients freed), from step 2 on
            _trim_heap()
            self.resident.append(self.probe.now())
        self.steps += 1
        return out

    @contextmanager
    def patched(self) -> Iterator[None]:
        for obj, name in self.targets:  # a plain function on the classes, so it binds the engine
            setattr(obj, name, getattr(self, name) if name == "build_model" else _as_method(getattr(self, name)))
        try:
            yield
        finally:
            for obj, name in self.targets:
                setattr(obj, name, self.orig[name])


def _one_run(job: Dict, width: int, steps: int) -> Dict:
    """One ``run_training`` of a ``width``-wide model in the running ranks, probed."""
    from dist_llm.launch.env import read_launch_env

    cfg = compose_cfg([*job["overrides"], "name=mem", f"train.max_steps={steps}", "train.micro_batch_size=1",
                       f"train.global_batch_size={job['accum'] * job['world']}", f"data.lanes={job['world']}",
                       f"model.n_layers={job['layers']}", f"model.d_model={width}", "model.n_heads=8",
                       *job["buckets"]], Path(job["workdir"]) / str(width))
    hooks = _Hooks()
    _trim_heap()
    with hooks.patched():
        ours(cfg, read_launch_env())
    hooks.probe.stop()
    states, where = max(hooks.probe.states)
    return {"params": hooks.params, "states": states, "states_at": where, "peaks": hooks.probe.peaks,
            "resident": max(hooks.resident), "master": hooks.master}


def master_bytes(optimizer) -> int:
    """Bytes of the fp32 master partition DeepSpeed clones (ZeRO-1/2: ``single_partition_of_fp32_groups``,
    ZeRO-3: ``fp32_partitioned_groups_flat``); 0 at ZeRO-0 (torch's AdamW on the module)."""
    flat = getattr(optimizer, "single_partition_of_fp32_groups", None) or \
        getattr(optimizer, "fp32_partitioned_groups_flat", None) or []
    return sum(t.numel() * t.element_size() for t in flat)


def memory_job(job: Dict, rank: int, world: int) -> Dict:
    """Warm-up, small and big model in this rank; every rank's figures gathered to rank 0."""
    import torch.distributed as dist

    import deepspeed  # noqa: F401  (imported before any baseline: its import is not training memory)

    job = {**job, "world": world}
    _one_run(job, job["small_width"], 2)  # warm-up: one-time costs land before the baselines
    mine = {"small": _one_run(job, job["small_width"], job["steps"]), "big": _one_run(job, job["width"], job["steps"])}
    per_rank: List = [None] * world
    dist.all_gather_object(per_rank, mine) if world > 1 else per_rank.__setitem__(0, mine)
    return {"ranks": per_rank}


def summarize(name: str, n: int, ranks: List[Dict], precision: str = "fp32") -> Dict:
    """Bytes/param per rank (slope between the two widths), worst rank reported, with theory."""
    big, small = ranks[0]["big"], ranks[0]["small"]
    dpsi = big["params"] - small["params"]

    def slope(get) -> float:
        return max((get(r["big"]) - get(r["small"])) / dpsi for r in ranks)

    peak_of = lambda run: max(run["peaks"].values())  # noqa: E731
    row = {"config": name, "ranks": n, "precision": precision, "params": big["params"], "params_small": small["params"],
           "states_bytes_per_param": slope(lambda run: run["states"]),
           "peak_bytes_per_param": slope(peak_of),
           "raw_states_bytes_per_param": max(r["big"]["states"] for r in ranks) / big["params"],
           "resident_after_step_bytes_per_param": slope(lambda run: run["resident"]),
           "master_bytes_per_param": slope(lambda run: run["master"]),
           "raw_peak_mb": max(peak_of(r["big"]) for r in ranks) / 2**20,
           "peak_phase": max(big["peaks"], key=big["peaks"].get), "states_at": big["states_at"],
           "peak_bytes_per_param_by_phase": {p: slope(lambda run, p=p: run["peaks"].get(p, 0))
                                             for p in PHASES if p in big["peaks"]},
           "theory_bytes_per_param": theory_bytes_per_param(name, n, precision),
           "deepspeed_theory_bytes_per_param": deepspeed_bytes_per_param(name, n, precision), "per_rank": ranks}
    return row


def print_table(rows: List[Dict]) -> None:
    print(f"{'config':<14} {'N':>2} {'params':>9} {'states B/p':>10} {'states at':>19} {'raw B/p':>7} "
          f"{'paper':>6} {'DS':>6} {'st/paper':>8} {'st/DS':>6} {'peak B/p':>8} {'peak at':>14} {'peak/DS':>7}")
    for r in rows:
        st, th, ds = r["states_bytes_per_param"], r["theory_bytes_per_param"], r["deepspeed_theory_bytes_per_param"]
        ds_cols = (f"{ds:>6.2f}", f"{st / ds:>6.2f}", f"{r['peak_bytes_per_param'] / ds:>7.2f}") if ds else \
            (f"{'-':>6}", f"{'-':>6}", f"{'-':>7}")
        print(f"{r['config']:<14} {r['ranks']:>2} {r['params']:>9} {st:>10.2f} {r['states_at']:>19} "
              f"{r['raw_states_bytes_per_param']:>7.2f} {th:>6.2f} {ds_cols[0]} {st / th:>8.2f} {ds_cols[1]} "
              f"{r['peak_bytes_per_param']:>8.2f} {r['peak_phase']:>14} {ds_cols[2]}")
    for r in (r for r in rows if r.get("precision", "fp32") == "fp32"):  # bf16: the master is in the paper's K
        print(f"{r['config']:<14} N={r['ranks']}: fp32 master clone {r['master_bytes_per_param']:.2f} B/param, "
              f"states - master {r['states_bytes_per_param'] - r['master_bytes_per_param']:.2f} "
              f"(paper {r['theory_bytes_per_param']:.2f}), after the step {r['resident_after_step_bytes_per_param']:.2f}")
    for r in rows:
        phases = " ".join(f"{p}={v:.2f}" for p, v in r["peak_bytes_per_param_by_phase"].items())
        print(f"peak B/param by phase  {r['config']:<14} N={r['ranks']}: {phases}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--small-width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--accum", type=int, default=2, help="micro-batches (of 1 x 64 tokens) per step")
    ap.add_argument("--bucket", type=int, default=0, help="ZeRO bucket elements (0 = 1/64 of the big model)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--buckets", choices=["small", "default"], default="small",
                    help="default = DeepSpeed's bucket and ZeRO-3 gather defaults (5e8/5e7/1e9)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: mixed precision (bf16 weights and grads, fp32 master), the paper's K = 12 theory")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides, e.g. parallel.zero.max_reuse_distance=0")
    args = ap.parse_args()
    # Large tensors straight from mmap, so a freed one leaves RSS at once (glibc's default
    # threshold grows past the size of our weight matrices after the first frees and then keeps
    # freed matrices in the heap, where RSS counts them long after). Inherited by the spawned ranks.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    bucket = args.bucket or max(1 << 16, (args.layers * 12 * args.width ** 2) // 64)
    buckets = [f"parallel.zero.reduce_bucket_size={bucket}", f"parallel.zero.allgather_bucket_size={bucket}",
               f"parallel.zero.prefetch_bucket_size={bucket}", f"parallel.zero.max_live_parameters={bucket}",
               f"parallel.zero.max_reuse_distance={bucket}"] if args.buckets == "small" else []
    buckets += args.set
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for n in args.ranks:
            for name in args.configs:
                job = {"overrides": [*CONFIGS[name], f"parallel.precision={args.precision}"], "steps": args.steps,
                       "accum": args.accum, "layers": args.layers, "width": args.width, "small_width": args.small_width, "buckets": buckets,
                       "workdir": str(Path(d) / f"{name}{n}")}
                t0 = time.time()
                ranks = run_ranks(n, job, "bench.memory:memory_job")["ranks"]
                rows.append(summarize(name, n, ranks, args.precision))
                print(f"  {name} N={n}: {time.time() - t0:.0f} s", flush=True)
    print_table(rows)
    result = "memory" if args.precision == "fp32" else f"memory_{args.precision}"
    print(f"results: {write_result(result, {'args': vars(args), 'bucket_elements': bucket, 'rows': rows})}")


if __name__ == "__main__":
    main()
