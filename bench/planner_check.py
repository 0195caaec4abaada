"""Predicted vs measured peak memory per rank on the CPU mock cluster (issue 13, item 4).

For each configuration (ZeRO 0-3, tp=2, pp=2, activation checkpointing) and model size, runs a
real short training with the real CLI (``dist-llm train ... launcher.nproc=2``, fp32, no
checkpoint at the end, logging=none) and reads every rank's peak resident set size (VmHWM in
/proc/<pid>/status, the kernel's high-water mark; polled until the rank exits, it only grows).

Baseline: the same configuration with a ~0-parameter model (d_model 16), run the same way. Its
VmHWM holds everything that does not scale with the model: the interpreter, torch/DeepSpeed/
Megatron imports, the process group, the data loader and DeepSpeed's bookkeeping. The measured
model memory is ``VmHWM(model) - VmHWM(tiny)`` per rank (max over ranks), compared with the
planner's ``estimate_peak_memory(model) - estimate_peak_memory(tiny)`` for the CPU memory model.

    flock /tmp/dist-llm-heavy.lock env PYTHONPATH=$PWD .venv/bin/python bench/planner_check.py \
        --sizes 20m --configs zero0,zero1 [--out bench/results/planner_check.json]

Several invocations append to the same --out file (one entry per size/config), so the check can
be run in pieces under the shared lock. Figures on the shared machine are provisional.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEQ = 256
COMMON = ["train.eval_every=0", "train.ckpt_every=0", "train.save_at_end=false", "train.sample_tokens=0",
          "logging=none", "train.progress_bar=off", "data.embedded_max_bytes=400000", f"train.seq_len={SEQ}",
          "train.micro_batch_size=4", "train.global_batch_size=8", "train.resume=never", "parallel.precision=fp32",
          "parallel.device=cpu", "launcher.nproc=2", "optim.warmup_steps=1"]
SIZES = {  # gpt2 preset, vocab 320 (byte-level embedded corpus); total params in the comment
    "tiny": ["model.n_layers=2", "model.n_heads=2", "model.d_model=16"],  # ~15k: the baseline
    "20m": ["model.n_layers=6", "model.n_heads=8", "model.d_model=512"],  # ~19.2M
    "50m": ["model.n_layers=8", "model.n_heads=8", "model.d_model=704"],  # ~47.9M
    # ~34.6M: held out for the Megatron fit (tp2 only: 7 layers do not split into 2 pipeline stages)
    "35m": ["model.n_layers=7", "model.n_heads=8", "model.d_model=640"],
}
CONFIGS = {
    "zero0": ["parallel=zero0"], "zero1": ["parallel=zero1"], "zero2": ["parallel=zero2"],
    "zero3": ["parallel=zero3"], "tp2": ["parallel=tp2"], "pp2": ["parallel=pp2"],
    "zero2_ckpt": ["parallel=zero2", "model.activation_checkpointing=true"],
}


def overrides(size: str, config: str) -> list:
    return [*COMMON, *SIZES[size], f"model.max_seq_len={SEQ}", "model.vocab_size=320", *CONFIGS[config]]


def _hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _rank_of(pid: int) -> int:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return int(env.get(b"RANK", b"-1"))


def measure(workdir: Path, name: str, ovr: list, steps: int) -> dict:
    """Run one training; returns {rank: peak RSS bytes} and the wall time."""
    import psutil

    cmd = [sys.executable, "-m", "dist_llm.cli.main", "train", f"name={name}", f"train.max_steps={steps}",
           f"data.embedded_dir={workdir / 'data'}", *ovr]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict = {}
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for child in parent.children(recursive=True):
                try:
                    rank = _rank_of(child.pid)
                    if rank >= 0:
                        peaks[rank] = max(peaks.get(rank, 0), _hwm_kb(child.pid) * 1024)
                except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
                    pass
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"training {name} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"peaks": peaks, "wall_s": time.time() - t0}


def predict(size: str, config: str) -> dict:
    from dist_llm.config.store import compose
    from dist_llm.planner import estimate_peak_memory

    cfg = compose(overrides(size, config))
    return estimate_peak_memory(cfg, 2, device="cpu").as_dict()


LLAMA = {  # Llama-2 shapes (vocab 32000, untied, RMSNorm, SwiGLU); 70B with 8 kv heads
    "7B": dict(preset="llama", n_layers=32, n_heads=32, d_model=4096, d_ff=11008, vocab_size=32000, max_seq_len=4096),
    "70B": dict(preset="llama", n_layers=80, n_heads=64, n_kv_heads=8, d_model=8192, d_ff=28672, vocab_size=32000,
                max_seq_len=4096),
}
# (model, gpus, global batch, layouts): the planner's choice plus the usual hand-picked layouts
PAPER_CASES = [
    ("7B", 8, 256, [dict(dp=8, zero_stage=1, micro_batch_size=1), dict(dp=8, zero_stage=3, micro_batch_size=2),
                    dict(dp=4, tp=2, sp=True, zero_stage=1, micro_batch_size=1),
                    dict(dp=1, tp=8, sp=True, zero_stage=0, micro_batch_size=1)]),
    ("70B", 64, 512, [dict(dp=8, tp=8, sp=True, zero_stage=1, micro_batch_size=1, activation_checkpointing=True),
                      dict(dp=2, tp=8, pp=4, sp=True, zero_stage=1, micro_batch_size=1),
                      dict(dp=64, zero_stage=3, micro_batch_size=1, activation_checkpointing=True),
                      dict(dp=1, tp=8, pp=8, sp=True, zero_stage=0, micro_batch_size=1)]),
]


def megatron_formula(mc, seq: int, lay, n_micro: int) -> float:
    """Megatron-LM's theoretical_memory_usage.py (bf16, distributed optimizer = our ZeRO-1,
    sequence parallel, selective recompute), written out for these layouts."""
    h, f, L, V, a, g = mc.d_model, mc.d_ff, mc.n_layers, mc.vocab_size, mc.n_heads, mc.n_kv_heads
    layers = 2 * L * h * h * ((1 + g / a) + f / h * 1.5 + 2 / h + 1 / (L * h))
    emb = h * V
    shard = (layers / lay.pp + emb) / lay.tp + (emb / lay.tp if lay.pp == 1 else 0)
    per_param = 6 + 12 / lay.dp if lay.zero_stage >= 1 else 18
    act = seq * lay.micro_batch_size * h * (18 + 4 * f / h) * L
    act += 8 * seq * lay.micro_batch_size * lay.pp + seq * lay.micro_batch_size * h * lay.pp
    if lay.pp > 1:
        act *= min(1, n_micro / lay.pp)
    else:
        act += seq * lay.micro_batch_size * h * 4 * (1 + V / h)
    return shard * per_param + act / lay.tp


def paper_table(seq: int = 4096) -> str:
    from dist_llm.config.schema import ModelConfig
    from dist_llm.planner import Hardware, Layout, MemoryModel, count_params, estimate_layout, plan, step_time
    from dist_llm.planner.params import resolved

    mm = MemoryModel(precision="bf16", allocator_overhead=0.10)
    gib = lambda x: f"{x / 2**30:.1f}"  # noqa: E731
    rows = ["| model | layout (8 x 80 GB per node) | weights | grads | optim | activ. | logits | buffers | alloc | "
            "**total** | Megatron formula | ZeRO paper states | step s |", "|" + "---|" * 13]
    for name, gpus, gbs, layouts in PAPER_CASES:
        mc = resolved(ModelConfig(**LLAMA[name]))
        hw = Hardware(gpus_per_node=8, nodes=gpus // 8, gpu_mem_bytes=80e9)
        best = next(c for c in plan(mc, seq, gbs, hw, mm) if c.fits).layout
        n = count_params(mc).total
        for i, kw in enumerate([None, *layouts]):
            lay = best if kw is None else Layout(**kw)
            if kw is not None and lay == best:
                continue
            est = estimate_layout(mc, seq, gbs, lay, mm)
            t = step_time(mc, seq, gbs, lay, hw, "bf16")["total"]
            n_micro = gbs // (lay.micro_batch_size * lay.dp)
            z = lay.zero_stage
            zero_states = n / (lay.tp * lay.pp) * ((2 if z < 3 else 2 / lay.dp) + (2 if z < 2 else 2 / lay.dp)
                                                   + (12 if z < 1 else 12 / lay.dp))
            meg = gib(megatron_formula(mc, seq, lay, n_micro)) if not lay.activation_checkpointing else "n/a"
            desc = (f"{'**planner best** ' if kw is None else ''}dp{lay.dp} tp{lay.tp} pp{lay.pp} z{lay.zero_stage}"
                    f"{' sp' if lay.sp else ''}{' ckpt' if lay.activation_checkpointing else ''} mbs{lay.micro_batch_size}")
            rows.append(f"| {name} ({n / 1e9:.2f}B) | {desc} | {gib(est.params)} | {gib(est.grads)} | "
                        f"{gib(est.optimizer)} | {gib(est.activations)} | {gib(est.logits)} | {gib(est.comm_buffers)} | "
                        f"{gib(est.overhead)} | **{gib(est.device_total)}** | {meg} | {gib(zero_states)} | {t:.2f} |")
    return "\n".join(rows)


def measured_table(results: dict) -> str:
    """Markdown: per size/config the measured and predicted model memory (MiB) and the error;
    predictions are recomputed with the current memory model (the measurements stay)."""
    rows = ["| size | config | baseline VmHWM (MiB) | measured model memory (MiB) | predicted (MiB) | error |",
            "|---|---|---|---|---|---|"]
    for key in sorted(results, key=lambda k: (list(SIZES).index(k.split("/")[0]), list(CONFIGS).index(k.split("/")[1]))):
        size, config = key.split("/")
        if size == "tiny":
            continue
        base = results[f"tiny/{config}"]
        measured = results[key]["measured_peak"] - base["measured_peak"]
        predicted = predict(size, config)["device_total"] - predict("tiny", config)["device_total"]
        rows.append(f"| {size} | {config} | {base['measured_peak'] / 2**20:.0f} | {measured / 2**20:.0f} | "
                    f"{predicted / 2**20:.0f} | {100 * (predicted - measured) / measured:+.1f}% |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20m,50m")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/planner_check")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner_check.json"))
    ap.add_argument("--table", action="store_true", help="print the measured table of --out as Markdown")
    ap.add_argument("--paper-table", action="store_true", help="print the 7B/70B table of docs/planner.md")
    args = ap.parse_args(argv)
    if args.paper_table:
        print(paper_table())
        return 0
    if args.table:
        print(measured_table(json.loads(Path(args.out).read_text())))
        return 0
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for config in args.configs.split(","):
        base_key = f"tiny/{config}"
        if base_key not in results:
            m = measure(workdir, f"tiny-{config}", overrides("tiny", config), args.steps)
            results[base_key] = {"measured_peak": max(m["peaks"].values()), "peaks": m["peaks"],
                                 "predicted": predict("tiny", config), "wall_s": m["wall_s"]}
        base = results[base_key]
        for size in args.sizes.split(","):
            m = measure(workdir, f"{size}-{config}", overrides(size, config), args.steps)
            pred = predict(size, config)
            measured = max(m["peaks"].values()) - base["measured_peak"]
            predicted = pred["device_total"] - base["predicted"]["device_total"]
            results[f"{size}/{config}"] = {
                "measured_peak": max(m["peaks"].values()), "peaks": m["peaks"], "measured_model_bytes": measured,
                "predicted_model_bytes": predicted, "rel_error": (predicted - measured) / measured,
                "predicted": pred, "wall_s": m["wall_s"]}
            print(f"{size:>4} {config:<11} measured {measured / 2**20:8.1f} MiB  predicted {predicted / 2**20:8.1f} MiB"
                  f"  error {100 * (predicted - measured) / measured:+6.1f}%  ({m['wall_s']:.0f}s)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
