"""One GPU: tokens/s, MFU and peak memory of our DeepSpeed engine (ZeRO-1), our Megatron engine
(tp=1) and a hand-written loop, on the ~1B llama-style model in bf16 (run by bench/gpu_check.sh).

    python -m bench.gpu_train [--steps 50] [--warmup 10] [--micro 4] [--seq 2048]
    python -m bench.gpu_train --cpu-smoke     # the same code path on CPU with the demo model

Ours runs through the real CLI (one rank, NCCL); its figures are medians of the logged
``tokens_per_s``, ``perf/mfu`` and the peak ``mem/max_allocated_gb`` over the steps after warm-up.
The plain loop keeps fp32 weights with bf16 autocast and fused AdamW (what a hand-written bf16
loop looks like), the same model, batch and data. Writes bench/results/gpu_train.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from bench._loops import ROOT, write_result


def _common(args, workdir: Path) -> List[str]:
    model = "model=demo" if args.cpu_smoke else "model=llama_1b"
    return [model, f"train.seq_len={args.seq}", f"train.micro_batch_size={args.micro}",
            f"train.global_batch_size={args.micro}", "data.lanes=1", f"train.max_steps={args.steps}",
            "train.eval_every=0", "train.checkpoint.every=0", "train.checkpoint.save_at_end=false",
            "train.checkpoint.keep_best=false", "train.sample.tokens=0", "logging=none", "train.ui.progress_bar=off",
            "train.log_every=1", f"data.embedded_max_bytes={args.data_bytes}", f"data.embedded_dir={workdir / 'data'}",
            f"output_dir={workdir / 'runs'}", "launcher.nproc=1",
            f"parallel.device={'cpu' if args.cpu_smoke else 'cuda'}",
            f"parallel.precision={'fp32' if args.cpu_smoke else 'bf16'}"]


def run_ours(args, workdir: Path, name: str, parallel: List[str]) -> Dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "WANDB_MODE": "disabled"}
    if not args.cpu_smoke:
        env.pop("DS_ACCELERATOR", None)
    cmd = [sys.executable, "-m", "dist_llm.cli.main", "train", *_common(args, workdir), *parallel, f"name={name}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=workdir, env=env, check=True, timeout=args.timeout)
    recs = [json.loads(x) for x in (workdir / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "train/loss" in r][args.warmup:]
    med = lambda k: statistics.median(r[k] for r in recs) if recs and k in recs[0] else float("nan")  # noqa: E731
    peak = max((r.get("mem/max_allocated_gb", r.get("mem/rss_gb", float("nan"))) for r in recs), default=float("nan"))
    return {"tokens_per_s": med("tokens_per_s"), "mfu": med("perf/mfu"), "peak_gb": peak,
            "final_loss": recs[-1]["train/loss"] if recs else None, "wall_s": time.perf_counter() - t0}


def run_plain(args, workdir: Path) -> Dict:
    """Hand-written loop in this process on the same data (the corpus the first run built)."""
    from dist_llm.config.store import compose
    from dist_llm.data import TrainLoader
    from dist_llm.models import build_model, flops_per_token
    from dist_llm.observability import gpu_peak_flops
    from dist_llm.parallel.deepspeed_common import param_groups

    cfg = compose(_common(args, workdir))
    dev = torch.device("cpu" if args.cpu_smoke else "cuda")
    loader = TrainLoader([(str(workdir / "data" / "train"), 1.0)], args.seq, 1, 0, 1, args.micro, 1, cfg.data.seed)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(dev)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, fused=dev.type == "cuda")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ends, losses = [], []
    t0 = time.perf_counter()
    from dist_llm.train.schedule import lr_at

    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.optim, args.steps)
        (mb,) = loader.next_step()
        mb = mb.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model(mb[:, :-1], mb[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # one sync per step, as ours
        ends.append(time.perf_counter())
    loader.close()
    stamps = [t0, *ends]
    tps = args.micro * args.seq * (args.steps - args.warmup) / (stamps[-1] - stamps[args.warmup])
    peak_flops = gpu_peak_flops(torch.cuda.get_device_name(dev), "bf16") if dev.type == "cuda" else None
    mfu = tps * flops_per_token(cfg.model, args.seq) / peak_flops if peak_flops else float("nan")
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    return {"tokens_per_s": tps, "mfu": mfu, "peak_gb": peak, "final_loss": losses[-1],
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--data-bytes", type=int, default=3_000_000)
    ap.add_argument("--timeout", type=int, default=240, help="seconds per run of ours")
    ap.add_argument("--cpu-smoke", action="store_true", help="demo model on CPU, few steps: checks the script")
    args = ap.parse_args()
    if args.cpu_smoke:
        args.steps, args.warmup, args.micro, args.seq, args.data_bytes = 6, 2, 4, 64, 200_000
    rows: Dict[str, Dict] = {}
    with tempfile.TemporaryDirectory() as d:
        workdir = Path(d)
        rows["deepspeed zero1"] = run_ours(args, workdir, "ds", ["parallel=zero1"])
        rows["megatron tp=1"] = run_ours(args, workdir, "mg", ["parallel=megatron", "parallel.tp=1"])
        rows["hand-written loop"] = run_plain(args, workdir)
    params = rows["hand-written loop"]["params"]
    print(f"\nmodel {params / 1e9:.2f}B params, {args.micro} x {args.seq} tokens per step, {args.steps} steps "
          f"({args.warmup} warm-up), {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}")
    print(f"{'':<18} {'tokens/s':>10} {'MFU':>6} {'peak GB':>8} {'loss':>7}")
    for name, r in rows.items():
        print(f"{name:<18} {r['tokens_per_s']:>10.0f} {r['mfu']:>6.3f} {r['peak_gb']:>8.2f} {r['final_loss']:>7.3f}")
    print(f"results: {write_result('gpu_train_cpu_smoke' if args.cpu_smoke else 'gpu_train', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
