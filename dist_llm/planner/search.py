"""Enumerate the layouts our engines can run, keep those that fit, rank them by step time."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional

from dist_llm.planner.memory import Layout, MemoryEstimate, MemoryModel, estimate_layout
from dist_llm.planner.params import resolved
from dist_llm.planner.time import Hardware, step_time


@dataclass
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    time: dict
    fits: bool


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two_upto(n: int) -> List[int]:
    out, x = [], 1
    while x <= n:
        out.append(x)
        x *= 2
    return out


def enumerate_layouts(model_cfg, global_batch: int, hw: Hardware) -> Iterator[Layout]:
    """Every layout of ``hw.world`` ranks our engines accept (config/validate.py's rules):
    tp inside a node and dividing the (kv) heads; pp dividing the layers; vpp only with pp > 1;
    ZeRO 0-3 and offload on the DeepSpeed engine (tp = pp = 1), ZeRO 0-2 under Megatron TP,
    ZeRO 0-1 with pipelines; micro-batches dividing global_batch / dp."""
    m = resolved(model_cfg)
    world = hw.world
    for tp in _divisors(min(world, hw.gpus_per_node)):
        if m.n_heads % tp or m.n_kv_heads % tp:
            continue
        for pp in _divisors(world // tp):
            if m.n_layers % pp:
                continue
            dp = world // (tp * pp)
            if global_batch % dp:
                continue
            for vpp in ([1, 2] if pp > 1 else [1]):
                if m.n_layers % (pp * vpp):
                    continue
                yield from _variants(dp, tp, pp, vpp, global_batch)


def _variants(dp: int, tp: int, pp: int, vpp: int, global_batch: int) -> Iterator[Layout]:
    deepspeed = tp == 1 and pp == 1
    stages = [0, 1, 2, 3] if deepspeed else ([0, 1, 2] if pp == 1 else [0, 1])
    for zero in stages:
        offloads = [(False, False)]
        if deepspeed and zero >= 1:
            offloads.append((True, False))
        if deepspeed and zero == 3:
            offloads.append((True, True))
        for off_opt, off_par in offloads:
            for ckpt in (False, True):
                for mbs in _powers_of_two_upto(global_batch // dp):
                    n_micro = global_batch // (mbs * dp)
                    if (global_batch // dp) % mbs or (vpp > 1 and n_micro % pp):
                        continue
                    yield Layout(dp=dp, tp=tp, pp=pp, vpp=vpp, sp=tp > 1, zero_stage=zero,
                                 offload_optimizer=off_opt, offload_params=off_par,
                                 activation_checkpointing=ckpt, micro_batch_size=mbs)


def plan(model_cfg, seq_len: int, global_batch: int, hw: Hardware,
         mm: Optional[MemoryModel] = None) -> List[Candidate]:
    """All candidates, the ones that fit first, each group fastest first."""
    mm = mm or MemoryModel()
    out = []
    for layout in enumerate_layouts(model_cfg, global_batch, hw):
        mem = estimate_layout(model_cfg, seq_len, global_batch, layout, mm)
        t = step_time(model_cfg, seq_len, global_batch, layout, hw, mm.precision)
        out.append(Candidate(layout, mem, t, mem.device_total <= hw.gpu_mem_bytes))
    # fitting first, fastest first (ties: less memory, i.e. more headroom); then the rest by memory
    out.sort(key=lambda c: (not c.fits, round(c.time["total"], 6) if c.fits else 0.0, c.memory.device_total))
    return out


def override_line(layout: Layout, precision: str) -> str:
    """The Hydra overrides that select ``layout`` (conf/parallel/*.yaml field names)."""
    parts = [f"parallel.engine={layout.engine}", f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}",
             f"parallel.vpp={layout.vpp}", f"parallel.sp={str(layout.sp).lower()}",
             f"parallel.zero_stage={layout.zero_stage}",
             f"parallel.offload_optimizer={str(layout.offload_optimizer).lower()}",
             f"parallel.offload_params={str(layout.offload_params).lower()}",
             f"parallel.precision={precision}",
             f"model.activation_checkpointing={str(layout.activation_checkpointing).lower()}",
             f"train.micro_batch_size={layout.micro_batch_size}"]
    return " ".join(parts)
