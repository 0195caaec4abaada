"""One optimizer step of our engine versus a hand-written step, alternating every step.

    python -m bench.step_overhead [--steps 200] [--threads 1] [--zero 0] [--accum 1]

``bench.overhead`` compares whole runs (the trainer with its loader, callbacks and logging against
a plain loop), alternating every run: on a shared VM its ratio moves by several percent between
runs. This bench isolates the step: in one process, one rank, the same demo model (4 layers,
width 128) and batches of 12 x 64 tokens, it alternates ``DeepSpeedEngine.train_step`` and the
step a user would write (``zero_grad(set_to_none=True)``, forward, backward,
``clip_grad_norm_``, ``AdamW.step``, ``loss.item()``), swapping the order every step, so slow
drifts of the machine hit both sides alike. With ``--threads 1`` the time is this thread's CPU
time (``time.thread_time``: what the hypervisor steals is not in it); with more threads, wall
time. Reports the medians after the first 10% of steps and the ratio plain/ours (1.0 = no
overhead), and the Python calls per step of each side (cProfile, a separate pass). Writes
bench/results/step_overhead.json.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
from typing import Callable, Dict, List

import torch

from bench._loops import BASE, free_port, plain_adamw, write_result


def _sides(zero: int, accum: int) -> Dict[str, Callable[[int], None]]:
    from dist_llm.config.store import compose
    from dist_llm.models import build_model
    from dist_llm.parallel.deepspeed_engine import DeepSpeedEngine
    from dist_llm.parallel.layout import ParallelLayout

    cfg = compose([*BASE, f"train.global_batch_size={12 * accum}", f"parallel.zero_stage={zero}"])
    layout = ParallelLayout(rank=0, world_size=1, local_rank=0, dp=1, tp=1, pp=1, device=torch.device("cpu"),
                            backend="gloo")
    g = torch.Generator().manual_seed(0)
    shape = (cfg.train.micro_batch_size, cfg.train.seq_len + 1)  # bench.overhead's batch (BASE)
    steps = [[torch.randint(0, cfg.model.vocab_size, shape, generator=g) for _ in range(accum)] for _ in range(16)]
    torch.manual_seed(cfg.train.seed)
    engine = DeepSpeedEngine(cfg, build_model(cfg.model), layout)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    opt = cfg.optim
    optim = plain_adamw(model, opt)

    def plain(i: int) -> None:
        optim.zero_grad(set_to_none=True)
        for mb in steps[i % len(steps)]:
            loss = model(mb[:, :-1], mb[:, 1:]) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optim.step()
        loss.item()

    def ours(i: int) -> None:
        engine.train_step(steps[i % len(steps)], opt.lr)

    return {"plain": plain, "ours": ours, "calls": type(engine.calls).__name__}


def _calls_per_step(fn: Callable[[int], None], n: int = 20) -> float:
    prof = cProfile.Profile()
    prof.enable()
    for i in range(n):
        fn(i)
    prof.disable()
    return pstats.Stats(prof).total_calls / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="steps per side")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    args = ap.parse_args()
    os.environ.update({"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                       "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "WANDB_MODE": "disabled"})
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=0, world_size=1)
    sides = _sides(args.zero, args.accum)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    times: Dict[str, List[float]] = {"plain": [], "ours": []}
    for i in range(args.steps):
        for name in (("plain", "ours") if i % 2 == 0 else ("ours", "plain")):
            t = clock()
            sides[name](i)
            times[name].append(clock() - t)
    skip = args.steps // 10
    med = {k: statistics.median(v[skip:]) for k, v in times.items()}
    calls = {k: _calls_per_step(sides[k]) for k in ("plain", "ours")}
    ratio = med["plain"] / med["ours"]
    path = write_result("step_overhead", {"args": vars(args), "clock": clock.__name__, "engine_calls": sides["calls"],
                                          "median_step_s": med, "ratio_plain_over_ours": ratio,
                                          "python_calls_per_step": calls, "raw": times})
    print(f"{'side':<6} {'median ms':>10} {'calls/step':>11}   ({clock.__name__}, {args.threads} thread(s), "
          f"ZeRO-{args.zero}, accum {args.accum}, engine path {sides['calls']})")
    for k in ("plain", "ours"):
        print(f"{k:<6} {1e3 * med[k]:>10.2f} {calls[k]:>11.0f}")
    print(f"results: {path}")
    print(f"step_overhead engine=deepspeed zero={args.zero} threads={args.threads} ratio={ratio:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
