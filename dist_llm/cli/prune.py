"""``dist-llm prune <checkpoint | run dir> --out DIR``: magnitude or structured pruning + report.

Flags fill a typed :class:`~dist_llm.config.compress_schema.PruneConfig`, validated before any
model is loaded. Exit codes: 0 done, 2 bad flags or input (the message names the fix).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Dict, List

from dist_llm.config.compress_schema import (CompressConfigError, EvalLMConfig, FinetuneConfig, Importance,
                                             PruneConfig, PruneMethod, PruneScope)


def add_eval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--val-data", default=None, help="validation shard dir (default: the source run's)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the source run's train.seq_len")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=16, help="0 = the whole validation split")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def eval_config(args: argparse.Namespace) -> EvalLMConfig:
    return EvalLMConfig(val_dir=args.val_data, seq_len=args.seq_len, batch_size=args.eval_batch_size,
                        max_batches=args.eval_batches, device=args.device)


def parse(argv: List[str]) -> PruneConfig:
    p = argparse.ArgumentParser(prog="dist-llm prune", description=(
        "Prune one of our checkpoints (step-N/, best/ or a run dir). unstructured: zero the smallest-magnitude "
        "block linear weights (masks saved). structured: remove whole attention heads (kv groups under GQA) "
        "and MLP channels per layer by importance; a smaller model config comes out."))
    p.add_argument("source", help="checkpoint directory, best/ or run directory")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--method", choices=[m.value for m in PruneMethod], default="unstructured")
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured: fraction of weights zeroed")
    p.add_argument("--scope", choices=[s.value for s in PruneScope], default="global")
    p.add_argument("--heads", type=float, default=0.0, help="structured: fraction of heads removed per layer")
    p.add_argument("--mlp", type=float, default=0.0, help="structured: fraction of MLP channels removed per layer")
    p.add_argument("--importance", choices=[i.value for i in Importance], default="l2")
    p.add_argument("--importance-batches", type=int, default=4)
    p.add_argument("--finetune-steps", type=int, default=0, help="0 = no recovery fine-tune")
    p.add_argument("--finetune-lr", type=float, default=3e-4)
    p.add_argument("--finetune-batch-size", type=int, default=8)
    p.add_argument("--train-data", default=None, help="training shard dir (default: the source run's)")
    p.add_argument("--seed", type=int, default=0)
    add_eval_flags(p)
    a = p.parse_args(argv)
    return PruneConfig(
        source=a.source, out=a.out, method=PruneMethod(a.method), sparsity=a.sparsity, scope=PruneScope(a.scope),
        head_fraction=a.heads, mlp_fraction=a.mlp, importance=Importance(a.importance),
        importance_batches=a.importance_batches,
        finetune=FinetuneConfig(steps=a.finetune_steps, lr=a.finetune_lr, batch_size=a.finetune_batch_size,
                                train_dir=a.train_data, seed=a.seed),
        eval=eval_config(a), overwrite=a.force)


def run_compress_command(name: str, run: Callable[[Any], Dict[str, Any]], cfg: Any, summary_keys: tuple) -> int:
    """The shared driver of ``dist-llm prune`` / ``quantize``: run, print the report's table and a
    one-line JSON summary; a bad config or checkpoint is exit code 2 with the message."""
    from dist_llm.compress import CompressError

    try:
        report = run(cfg)
    except (CompressConfigError, CompressError, ValueError) as e:
        print(f"dist-llm {name}: {e}", file=sys.stderr)
        return 2
    print(report.pop("table"))
    print(json.dumps({k: report[k] for k in summary_keys}))
    return 0


def main(argv: List[str]) -> int:
    from dist_llm.compress.prune import run_prune

    return run_compress_command("prune", run_prune, parse(argv), ("out", "method", "final_sparsity", "model"))
