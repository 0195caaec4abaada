"""``dist-llm plan <overrides> [--gpus N --gpu-mem 80GB --nodes M ...]``: predicted peak memory per
rank of every layout our engines can run for this model, sequence length and batch, the layouts
that fit ranked by predicted step time, and the override line of the best (docs/planner.md)."""
from __future__ import annotations

import argparse
import re
import sys
from typing import List, Optional

from dist_llm.config.store import compose

GB = 1e9
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> float:
    """'80GB', '80 GiB', '141e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 80GB, 40GiB)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-llm plan", description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem", type=parse_bytes, default=80 * GB, help="memory per GPU, e.g. 80GB")
    p.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak per GPU (H100 bf16: 989)")
    p.add_argument("--intra-bw", type=float, default=150.0, help="GB/s per GPU inside a node")
    p.add_argument("--inter-bw", type=float, default=25.0, help="GB/s per GPU across nodes")
    p.add_argument("--overhead", type=float, default=0.10, help="allocator overhead fraction")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--top", type=int, default=10, help="how many fitting layouts to list")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for dist-llm train")
    return p


def _row(c) -> str:
    lay, mem = c.layout, c.memory
    gib = lambda x: f"{x / 2**30:6.1f}"  # noqa: E731
    name = (f"dp{lay.dp} tp{lay.tp} pp{lay.pp}" + (f" vpp{lay.vpp}" if lay.vpp > 1 else "")
            + (" sp" if lay.sp else "") + f" z{lay.zero_stage}" + (" offO" if lay.offload_optimizer else "")
            + (" offP" if lay.offload_params else "") + (" ckpt" if lay.activation_checkpointing else "")
            + f" mbs{lay.micro_batch_size}")
    return (f"{name:<36} {gib(mem.params)} {gib(mem.grads)} {gib(mem.optimizer)} {gib(mem.activations)} "
            f"{gib(mem.logits)} {gib(mem.comm_buffers)} {gib(mem.overhead)} {gib(mem.device_total)}"
            f"  {c.time['total']:8.3f}")


def main(argv: Optional[List[str]] = None) -> int:
    from dist_llm.planner import Hardware, MemoryModel, count_params, override_line, plan

    args = _parser().parse_args(argv)
    try:
        cfg = compose(args.overrides)
    except Exception as e:  # Hydra's composition errors name the key
        print(f"dist-llm plan: {e}", file=sys.stderr)
        return 2
    if cfg.model.init_from:
        from dist_llm.interop.init_from import derive_model_config

        cfg.model = derive_model_config(cfg.model)
    hw = Hardware(gpus_per_node=args.gpus, nodes=args.nodes, gpu_mem_bytes=args.gpu_mem,
                  peak_flops=args.peak_tflops * 1e12, mfu=args.mfu, intra_bw=args.intra_bw * GB,
                  inter_bw=args.inter_bw * GB)
    mm = MemoryModel(device=args.device, precision=cfg.parallel.precision, allocator_overhead=args.overhead,
                     dropout=cfg.model.dropout > 0)
    tr = cfg.train
    cands = plan(cfg.model, tr.seq_len, tr.global_batch_size, hw, mm)
    fits = [c for c in cands if c.fits]
    n = count_params(cfg.model).total
    print(f"model {n / 1e9:.3f}B params" if n >= 1e8 else f"model {n / 1e6:.3f}M params", end="")
    print(f", seq {tr.seq_len}, global batch "
          f"{tr.global_batch_size}, {cfg.parallel.precision}; {hw.nodes} x {hw.gpus_per_node} GPUs of "
          f"{hw.gpu_mem_bytes / GB:.0f} GB; {len(fits)} of {len(cands)} layouts fit")
    print(f"{'layout':<36} {'param':>6} {'grad':>6} {'optim':>6} {'act':>6} {'logit':>6} {'comm':>6} "
          f"{'alloc':>6} {'total':>6}  step(s)   [GiB per rank]")
    for c in (fits[: args.top] or cands[:3]):
        print(_row(c))
    if not fits:
        print("no layout fits: more GPUs, a shorter sequence or a smaller global batch", file=sys.stderr)
        return 1
    best = fits[0]
    print(f"\nbest: {best.time['total']:.3f} s/step predicted, {best.memory.device_total / 2**30:.1f} GiB per rank")
    line = override_line(best.layout, cfg.parallel.precision)
    chosen = {part.split("=", 1)[0] for part in line.split()}
    kept = [o for o in args.overrides if o.split("=", 1)[0].lstrip("+~") not in chosen]
    print(" ".join(["dist-llm train", *kept, line]))
    return 0
