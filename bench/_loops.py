"""Shared machinery of the training benches: N ranks in one process group, and in each rank the
same configuration run alternately through our trainer and through a minimal hand-written loop.

Both sides get the same model (``build_model`` with the same seed), the same batches (the same
``TrainLoader``), the same ``torch.optim.AdamW`` settings and parameter groups, the same grad
clipping and the same thread count, and both are timed the same way: a ``perf_counter`` stamp at
the end of every step; steady-state tokens/s = tokens of the steps after warm-up / wall time of
those steps (data wait, callbacks and logging included on our side: that is the overhead).

Our side runs the real ``run_training`` (as every launcher does) in the already-started process
group; the bench only keeps it from tearing the group down between runs and records step ends.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# The demo model at the batch (12 x 64 tokens per rank), no eval/checkpoint/sample.
BASE = ["model=demo", "train.seq_len=64", "train.micro_batch_size=12", "train.eval_every=0",
        "train.checkpoint.every=0", "train.checkpoint.save_at_end=false", "train.checkpoint.keep_best=false",
        "train.sample.tokens=0", "logging=none", "train.ui.progress_bar=off", "train.ui.peak_flops=1e12",
        "data.embedded_max_bytes=400000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steady_tokens_per_s(ends: List[float], start: float, tokens_per_step: int, warmup: int) -> float:
    stamps = [start, *ends]
    if len(ends) <= warmup:
        raise ValueError(f"{len(ends)} steps recorded, need more than warmup={warmup}")
    return tokens_per_step * (len(ends) - warmup) / (stamps[-1] - stamps[warmup])


def compose_cfg(overrides: List[str], workdir: Path):
    from dist_llm.config.store import compose

    import dataclasses

    from dist_llm.config.schema import DatasetSource
    from dist_llm.prepare import build_stdlib_corpus

    cfg = compose([*BASE, f"output_dir={workdir / 'runs'}", f"data.embedded_dir={workdir / 'data'}", *overrides])
    import torch.distributed as dist

    multi = dist.is_initialized() and dist.get_world_size() > 1
    if not multi or dist.get_rank() == 0:  # one writer: ranks racing on the same shard files fail
        build_stdlib_corpus(cfg.data.embedded_dir, cfg.train.seq_len, max_bytes=cfg.data.embedded_max_bytes)
    if multi:
        dist.barrier()
    data = dataclasses.replace(cfg.data, train=[DatasetSource(path=str(workdir / "data" / "train"), weight=1.0)],
                               val=str(workdir / "data" / "val"), build_embedded=False)
    return dataclasses.replace(cfg, data=data)


def plain_adamw(model, opt) -> torch.optim.AdamW:
    """torch's AdamW with our weight-decay groups and ``opt``'s settings: the hand-written side."""
    from dist_llm.parallel.deepspeed_common import param_groups

    return torch.optim.AdamW(param_groups(model, opt.weight_decay), lr=opt.lr, betas=(opt.beta1, opt.beta2),
                             eps=opt.eps, weight_decay=opt.weight_decay)


def plain_loop(cfg, steps: int, world: int) -> List[float]:
    """The hand-written loop: build_model, AdamW with the same groups, (DDP over gloo at world > 1),
    clip, step; one ``loss.item()`` per step, as any loop that prints its loss. Returns step ends."""
    import torch.distributed as dist
    import torch.nn as nn

    from dist_llm.data import TrainLoader
    from dist_llm.models import build_model
    from dist_llm.train.schedule import lr_at

    tr, opt = cfg.train, cfg.optim
    rank = dist.get_rank() if world > 1 else 0
    accum = tr.global_batch_size // (tr.micro_batch_size * world)
    loader = TrainLoader.from_config(cfg.data, tr, rank, world, accum)
    torch.manual_seed(tr.seed)
    model = build_model(cfg.model)
    optim = plain_adamw(model, opt)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    ends: List[float] = []
    for step in range(steps):
        for g in optim.param_groups:
            g["lr"] = lr_at(step, opt, tr.max_steps)
        batches = loader.next_step()
        optim.zero_grad(set_to_none=True)
        for i, mb in enumerate(batches):
            ctx = net.no_sync() if world > 1 and i < len(batches) - 1 else _null()
            with ctx:
                loss = net(mb[:, :-1], mb[:, 1:]) / len(batches)
                loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optim.step()
        loss.item()
        ends.append(time.perf_counter())
    loader.close()
    return ends


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def ours(cfg, le) -> List[float]:
    """``run_training`` in the running process group; returns the perf_counter at each step end."""
    import dist_llm.parallel.layout as layout_mod
    from dist_llm.train import callbacks as cb_mod
    from dist_llm.train.run import run_training

    ends: List[float] = []
    orig_end = cb_mod.MetricsCallback.on_step_end
    orig_shutdown = layout_mod.shutdown

    def stamped(self, trainer, stats, step_time_s):
        orig_end(self, trainer, stats, step_time_s)
        ends.append(time.perf_counter())

    def keep_group() -> None:  # the next run reuses the process group; Megatron's groups are rebuilt
        if "megatron.core.parallel_state" in sys.modules:
            sys.modules["megatron.core.parallel_state"].destroy_model_parallel()

    cb_mod.MetricsCallback.on_step_end = stamped
    layout_mod.shutdown = keep_group
    try:
        run_training(cfg, le)
    finally:
        cb_mod.MetricsCallback.on_step_end = orig_end
        layout_mod.shutdown = orig_shutdown
    return ends


def _worker(rank: int, world: int, port: int, job: Dict, out: str, fn_name: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"})
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as run_training does
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import importlib

    mod_name, _, fn = fn_name.rpartition(":")
    result = getattr(importlib.import_module(mod_name), fn)(job, rank, world)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    import dist_llm.parallel.layout as layout_mod

    layout_mod.shutdown()


def run_ranks(world: int, job: Dict, fn_name: str) -> Dict:
    """Run ``fn_name`` ("module:function", called as fn(job, rank, world)) on ``world`` ranks."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "result.json")
        try:
            mp.start_processes(_worker, args=(world, free_port(), job, out, fn_name), nprocs=world,
                               start_method="spawn", join=True)
        except mp.ProcessExitedException as e:
            # A rank that aborts in teardown after rank 0 wrote the result (seen with ZeRO-2 +
            # offload: "terminate called without an active exception") has still measured.
            if not Path(out).exists():
                raise
            print(f"warning: {e} after the result was written; result kept", file=sys.stderr)
        return json.loads(Path(out).read_text())


def cpu_ticks() -> Optional[Tuple[int, int]]:
    """(steal, total) CPU ticks of the machine so far, from /proc/stat (None where there is none).
    Steal is time the hypervisor gave this VM's CPUs to someone else: a run with a few percent
    of it is slowed by that much for reasons that are neither side's."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def max_known(xs) -> Optional[float]:
    """The largest of ``xs`` that is not None (None if there is none)."""
    return max((x for x in xs if x is not None), default=None)


def steal_percent(before: Optional[Tuple[int, int]], after: Optional[Tuple[int, int]]) -> Optional[float]:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


def stats(xs: List[float]) -> Dict[str, float]:
    import statistics

    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def write_result(name: str, payload: Dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def machine() -> Dict:
    import platform

    return {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


Fn = Callable[[Dict, int, int], Dict]
