"""``dist-llm eval <run dir | checkpoint | HF dir> [overrides]``: a model's figures on a shard split.

Overrides are the job config's (``data.val=...``, ``launcher.nproc=2``, ``task.kind=...``) plus
``eval.*`` (:class:`EvalOptions`). Prints progress to stderr and the result as one JSON object on
the last line of stdout; writes it to ``eval.json`` beside the checkpoint (``eval.out``), a
confusion-matrix PNG for classification, and logs ``eval/*`` through the observability logger
(W&B offline by default when ``logging.backend=wandb``). Runs on the local mock cluster
(``launcher.nproc=N``), under torchrun or srun: each rank evaluates a disjoint slice.
Exit 2 on a bad source or config.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple


@dataclasses.dataclass
class EvalOptions:
    split: str = "val"  # val | train
    max_samples: int = 0  # 0 = the whole split
    batch_size: int = 32
    out: Optional[str] = None  # default: <checkpoint dir>/eval.json
    seq_len: Optional[int] = None  # causal LM: evaluate on the first seq_len tokens of each window


def _parse(args: List[str]) -> Tuple[str, EvalOptions, List[str]]:
    if not args or args[0].startswith("-") or "=" in args[0]:
        raise ValueError("usage: dist-llm eval <run dir | checkpoint | HF dir> [key=value ...]")
    opts, rest = EvalOptions(), []
    names = {f.name: f for f in dataclasses.fields(EvalOptions)}
    for a in args[1:]:
        if "=" not in a:
            raise ValueError(f"{a!r}: overrides are key=value (e.g. data.val=data/x/val eval.max_samples=512)")
        key, value = a.split("=", 1)
        if key.startswith("eval."):
            name = key[5:]
            if name not in names:
                raise ValueError(f"{key}: unknown; eval options are {', '.join('eval.' + n for n in names)}")
            cast = int if name in ("max_samples", "batch_size", "seq_len") else str
            try:
                setattr(opts, name, cast(value))
            except ValueError as e:
                raise ValueError(f"{key}={value!r}: {e}") from e
        else:
            rest.append(a)
    if opts.split not in ("val", "train"):
        raise ValueError(f"eval.split={opts.split!r} must be val or train")
    if opts.batch_size < 1:
        raise ValueError(f"eval.batch_size={opts.batch_size} must be >= 1")
    return args[0], opts, rest


def main(args: List[str]) -> int:
    from dist_llm.interop import InteropError

    try:
        path, opts, overrides = _parse(args)
        from dist_llm.evaluation.source import job_config, locate_source, val_split
        from dist_llm.evaluation.task_eval import split_path

        src = locate_source(path)
        cfg = job_config(src, overrides)
        split = split_path(val_split(cfg, opts.split))
    except (ValueError, InteropError, FileNotFoundError) as e:
        print(f"dist-llm eval: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # omegaconf errors on a bad override key or value
        if type(e).__module__.startswith("omegaconf"):
            print(f"dist-llm eval: bad override: {e}", file=sys.stderr)
            return 2
        raise
    from dist_llm.launch.env import read_launch_env

    # under torchrun/srun the ranks already exist; only a plain process spawns the mock cluster
    if cfg.launcher.nproc > 1 and read_launch_env().launcher == "single" and cfg.launcher.kind == "local":
        from dist_llm.launch.local import spawn_local

        return spawn_local(cfg.launcher.nproc, ["-m", "dist_llm.cli.main", "eval", *args], cfg.launcher.master_port)
    try:
        return _run_rank(src, cfg, opts, split)
    except InteropError as e:  # weights that do not fit the architecture
        print(f"dist-llm eval: {e}", file=sys.stderr)
        return 2


def _run_rank(src, cfg, opts: EvalOptions, split: str) -> int:
    import torch

    from dist_llm.config.schema import ParallelConfig
    from dist_llm.evaluation.source import describe, load_model
    from dist_llm.evaluation.task_eval import evaluate_task
    from dist_llm.launch.env import read_launch_env
    from dist_llm.parallel.layout import init_layout, shutdown
    from dist_llm.train.tasks import build_task

    le = read_launch_env()
    cuda = torch.cuda.is_available()
    device = f"cuda:{le.local_rank}" if cuda else "cpu"
    # Eval is data-parallel only: a plain layout (every rank holds the full model); its collectives
    # run on the layout's device like the trainer's.
    layout = init_layout(ParallelConfig(), le) if le.is_distributed else None
    try:
        torch.manual_seed(cfg.train.seed)
        task = build_task(cfg)
        model = load_model(src, cfg, task).to(device)
        reduce = (lambda t: _all_reduce(t, layout)) if layout is not None else None
        res = evaluate_task(task, model, split, le.rank, le.world_size, opts.max_samples, opts.batch_size,
                            device, opts.seq_len, reduce)
        res.update(describe(src), split=split, world_size=le.world_size)
        if le.rank == 0:
            _write_outputs(res, src, cfg, opts)
    finally:
        if layout is not None:
            shutdown()
    return 0


def _all_reduce(t, layout) -> None:
    on = t.to(layout.device)
    layout.all_reduce_world_sum(on)
    t.copy_(on.cpu())


def _write_outputs(res: dict, src, cfg, opts: EvalOptions) -> None:
    from dist_llm.config.store import config_to_dict
    from dist_llm.fileio import write_atomic
    from dist_llm.observability.loggers import build_logger

    out = Path(opts.out) if opts.out else src.path / "eval.json"
    if "confusion" in res:
        from dist_llm.evaluation.classes import save_confusion_png
        import torch

        png = save_confusion_png(torch.tensor(res["confusion"]), out.with_name(out.stem + "_confusion.png"),
                                 title=f"{src.path.name}: accuracy {res['accuracy']:.3f}")
        res["confusion_png"] = str(png)
    res["eval_json"] = str(out)
    text = json.dumps(res, default=str)
    write_atomic(out, (json.dumps(res, indent=1, default=str) + "\n").encode())
    # the logger's own files (metrics.jsonl, W&B offline run) go to a folder of their own, so the
    # checkpoint directory gains only eval.json and the PNG
    log_dir = out.parent / "eval-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    logger = build_logger(cfg.logging, str(log_dir), f"{cfg.name}-eval", config_to_dict(cfg), True)
    logger.log({f"eval/{k}": v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, 0)
    logger.finish(0)
    print(text, flush=True)
