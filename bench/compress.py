"""Compression figures (issue 11): pruning and int8 quantization of a small GPT trained here.

Trains a gpt2-preset model in-process on the embedded corpus (no download), saves it as our
checkpoint, then runs the real pipelines (the code behind `dist-llm prune` / `dist-llm quantize`):

* 50% unstructured magnitude pruning (global), then a short fine-tune with the masks kept;
* structured pruning of 25% of the heads (and, as a second row, 25% heads + 25% MLP channels),
  then the same fine-tune;
* int8 weight-only and dynamic-activation quantization.

It prints a table (params, nonzeros, safetensors bytes, perplexity before/after/after fine-tune,
int8 byte ratio) and the inference tokens/s of the structured models against the original,
measured side by side in alternating rounds (median), and writes everything as JSON.

    python -m bench.compress [--steps 400] [--finetune-steps 50] [--out bench/compress.json]

Figures on a shared CPU machine are noisy: treat them as provisional.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def train(root: Path, corpus: Path, args) -> Path:
    from compress_fixtures import SingleRank, WeightsEngine

    from dist_llm.checkpoint.manager import CheckpointManager
    from dist_llm.compress.finetune import train_batches
    from dist_llm.config.schema import DataConfig, DatasetSource, JobConfig, ModelConfig, TrainConfig
    from dist_llm.config.store import config_to_dict
    from dist_llm.data import ByteTokenizer
    from dist_llm.models.gpt import GPT

    torch.manual_seed(0)
    cfg = ModelConfig(preset="gpt2", n_layers=args.layers, n_heads=args.heads, d_model=args.d_model,
                      max_seq_len=args.seq_len, vocab_size=ByteTokenizer().vocab_size)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    batches = train_batches(str(corpus / "train"), args.seq_len, 16, seed=0)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        batch = next(batches)
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f}s, last loss {loss.item():.3f}", flush=True)
    job = JobConfig(model=cfg, data=DataConfig(train=[DatasetSource(path=str(corpus / "train"))],
                                               val=str(corpus / "val")), train=TrainConfig(seq_len=args.seq_len))
    return CheckpointManager(root / "run", SingleRank(), keep_last=1).save(
        args.steps, WeightsEngine(model), {"step": args.steps}, {}, config_to_dict(job))


def tokens_per_s(models: dict, seq_len: int, batch: int, rounds: int) -> dict:
    """Forward (inference) tokens/s of each model, alternating models every round; medians."""
    ids = torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in models}
    with torch.no_grad():
        for m in models.values():
            m.eval()(ids)  # warm-up
        for _ in range(rounds):
            for name, m in models.items():
                t0 = time.perf_counter()
                for _ in range(5):
                    m(ids)
                times[name].append((time.perf_counter() - t0) / 5)
    return {name: batch * seq_len / statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--finetune-steps", type=int, default=50)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(REPO / "bench" / "compress.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # steadier timings on a shared machine

    from dist_llm.compress.finetune import finetune
    from dist_llm.compress.prune import COLUMNS, run_prune
    from dist_llm.compress.report import model_figures
    from dist_llm.evaluation import evaluate_lm
    from dist_llm.compress.quantize import load_quantized
    from dist_llm.compress.quantize_cmd import COLUMNS as QCOLUMNS
    from dist_llm.compress.quantize_cmd import run_quantize
    from dist_llm.compress.report import format_table
    from dist_llm.compress.source import load_checkpoint_model
    from dist_llm.config.compress_schema import (EvalLMConfig, FinetuneConfig, PruneConfig, PruneMethod,
                                                 QuantizeConfig, QuantMode)
    from dist_llm.data import build_stdlib_corpus

    results: dict = {"args": vars(args), "provisional": "shared 2-core CPU machine; timings are noisy"}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        corpus = root / "data" / "stdlib"
        build_stdlib_corpus(corpus, args.seq_len, max_bytes=1_000_000)
        ckpt = str(train(root, corpus, args))
        ev = EvalLMConfig(batch_size=16, max_batches=32)
        ft = FinetuneConfig(steps=args.finetune_steps, lr=5e-4, batch_size=16)
        prunes = {
            "unstructured 50%": PruneConfig(source=ckpt, out=str(root / "u50"), sparsity=0.5, finetune=ft, eval=ev),
            "structured 25% heads": PruneConfig(source=ckpt, out=str(root / "h25"), method=PruneMethod.STRUCTURED,
                                                head_fraction=0.25, finetune=ft, eval=ev),
            "structured 25% heads + 25% mlp": PruneConfig(
                source=ckpt, out=str(root / "h25m25"), method=PruneMethod.STRUCTURED, head_fraction=0.25,
                mlp_fraction=0.25, finetune=ft, eval=ev),
        }
        rows = []
        for name, cfg in prunes.items():
            report = run_prune(cfg)
            report.pop("table")
            results[name] = report
            rows += [{**s, "stage": f"{name}: {s['stage']}"} for s in report["stages"][(0 if not rows else 1):]]
        # Control: the unpruned model fine-tuned the same way, so "after fine-tune" rows compare with
        # what the extra steps alone give (the small model here is not trained to convergence).
        control = load_checkpoint_model(ckpt).model
        finetune(control, str(corpus / "train"), args.seq_len, ft.steps, ft.lr, ft.batch_size, seed=ft.seed)
        ppl = evaluate_lm(control, str(corpus / "val"), args.seq_len, ev.batch_size, ev.max_batches)
        results["control original+finetune"] = ppl
        rows.append({"stage": f"control: original+finetune({ft.steps})", **model_figures(control, ppl)})
        print(format_table(rows, COLUMNS), flush=True)

        qrows = []
        for mode in QuantMode:
            report = run_quantize(QuantizeConfig(source=ckpt, out=str(root / f"q_{mode.value}"), mode=mode, eval=ev))
            report.pop("table")
            results[f"int8 {mode.value}"] = report
            qrows += report["stages"][(0 if not qrows else 1):2]
            print(f"int8 {mode.value}: {report['converted']}/{report['linears']} linears converted, linear-weight "
                  f"bytes {report['bytes_ratio']:.2f}x smaller, ppl change {100 * report['ppl_rel_change']:+.2f}%")
        print(format_table(qrows, QCOLUMNS), flush=True)

        models = {"original": load_checkpoint_model(ckpt).model,
                  "structured 25% heads": load_checkpoint_model(str(root / "h25")).model,
                  "structured 25% heads + 25% mlp": load_checkpoint_model(str(root / "h25m25")).model,
                  "int8 weight_only": load_quantized(str(root / "q_weight_only"))}
        speed = tokens_per_s(models, args.seq_len, 8, args.rounds)
        results["tokens_per_s"] = speed
        print(format_table([{"model": k, "tokens_per_s": round(v), "vs_original": v / speed["original"]}
                            for k, v in speed.items()], ["model", "tokens_per_s", "vs_original"]))
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
