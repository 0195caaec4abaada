"""``dist-llm``: one entry point, sub-commands dispatched here.

Kept import-light (no torch at import time) so a bad config fails in about a second.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

USAGE = """usage: dist-llm <command> [hydra overrides...]

commands:
  prepare  raw text/images -> clean, deduplicated, tokenized shards (conf/prepare.yaml)
  train    train a model (launcher=local launcher.nproc=N for an N-rank mock cluster)
  submit   submit a training job: dist-llm submit slurm|ray [--dry-run] <overrides>
  report   plots + Markdown summary from a run directory: dist-llm report runs/demo
  export   a checkpoint as a Hugging Face model: dist-llm export <ckpt | run dir> --format hf --out DIR
  serve    OpenAI-compatible API over a checkpoint: dist-llm serve <checkpoint|run dir> [--port N] [--ray]
  prune    prune a checkpoint: dist-llm prune <ckpt | run dir> --out DIR --method unstructured|structured
  quantize int8 a checkpoint: dist-llm quantize <ckpt | run dir> --out DIR --mode weight_only|dynamic
  eval     a model's figures on shards: dist-llm eval <run dir | checkpoint | HF dir> [data.val=DIR launcher.nproc=N]
  plan     memory per rank and step time of every layout: dist-llm plan <overrides> [--gpus 8 --gpu-mem 80GB --nodes M]
  doctor   check a job before spending an allocation: dist-llm doctor <train overrides>

examples:
  dist-llm prepare input=files input.paths='[corpus/*.jsonl.zst]' tokenizer=bpe output_dir=data/web
  dist-llm train experiment=demo
  dist-llm train parallel=zero3 launcher.nproc=2 train.max_steps=100
  dist-llm train -m parallel=zero1,zero2,zero3      # Hydra multirun sweep
"""


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "prepare":
        from dist_llm.cli.prepare import main as prepare_main

        return prepare_main(rest)
    if cmd == "train":
        from dist_llm.cli.train import train_cli

        return train_cli(rest)
    if cmd == "worker":  # internal: one rank of the local mock cluster
        from dist_llm.cli.train import worker_main

        return worker_main(rest)
    if cmd == "submit":
        from dist_llm.cli.submit import main as submit_main

        return submit_main(rest)
    if cmd == "report":
        from dist_llm.cli.report import main as report_main

        return report_main(rest)
    if cmd == "export":
        from dist_llm.cli.export import main as export_main

        return export_main(rest)
    if cmd == "serve":
        from dist_llm.cli.serve import main as serve_main

        return serve_main(rest)
    if cmd in ("prune", "quantize"):
        from importlib import import_module

        return import_module(f"dist_llm.cli.{cmd}").main(rest)
    if cmd == "eval":
        from dist_llm.cli.eval import main as eval_main

        return eval_main(rest)
    if cmd == "plan":
        from dist_llm.cli.plan import main as plan_main

        return plan_main(rest)
    if cmd in ("doctor", "doctor-rank"):  # doctor-rank: internal, one rank of the doctor job
        from dist_llm.cli import doctor

        return doctor.main(rest) if cmd == "doctor" else doctor.rank_main(rest)
    print(f"dist-llm: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def entry() -> None:
    is_rank = sys.argv[1:2] == ["worker"]  # read before the run (a library may edit sys.argv)
    code = main()
    if is_rank:
        _end_rank(code)
    sys.exit(code)


def _end_rank(code: int) -> None:
    """End a local-launcher rank whose run returned: exit handlers run (logging, multiprocessing
    children, weakref finalizers), stdout/stderr are flushed, then ``os._exit`` skips only the
    interpreter's teardown of torch, DeepSpeed and Megatron (module and C++ destructors: ~1 s of
    CPU per rank, paid by every launch). With a non-daemon thread still running the ordinary exit
    (which joins it) is kept."""
    import atexit
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()  # what the interpreter would run first (includes logging.shutdown)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to deliver
            pass
    os._exit(int(code or 0))


if __name__ == "__main__":
    entry()
