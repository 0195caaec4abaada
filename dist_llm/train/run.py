"""Wire one rank's training job together from a typed :class:`JobConfig`.

Every launcher ends here: the local mock cluster's workers, torchrun, srun tasks and Ray Train
workers all call :func:`run_training` in each rank's process.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional

from dist_llm.config.plan import RunPlan
from dist_llm.config.schema import DatasetSource, JobConfig
from dist_llm.config.store import config_to_dict
from dist_llm.config.validate import validate
from dist_llm.launch.env import LaunchEnv, read_launch_env, slurm_job_id

log = logging.getLogger("dist_llm.train")


def quiet_known_warnings() -> None:
    """Silence only the known noisy warnings, by the module they are attributed to: DeepSpeed
    (and Megatron) call deprecated torch.distributed APIs on every step and the warnings drown the
    log. Everything else, our own code included, still warns."""
    import warnings

    for module in ("deepspeed", "megatron", "torch.distributed"):
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=module)


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    quiet_known_warnings()
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", force=True)
    from dist_llm.observability.redact import install_log_redaction

    install_log_redaction()  # every handler of the root logger: secrets never reach a log line


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _prepare_embedded(cfg: JobConfig, layout) -> JobConfig:
    """Build the stdlib demo corpus on rank 0 (idempotent) and point the data config at it."""
    from dist_llm.prepare.embedded import build_embedded_set

    if layout.rank == 0:
        build_embedded_set(cfg.data.embedded_dir, str(cfg.data.embedded), cfg.train.seq_len,
                           max_bytes=cfg.data.embedded_max_bytes)
    layout.barrier()
    data = cfg.data
    train = data.train or [DatasetSource(path=str(Path(data.embedded_dir) / "train"), weight=1.0)]
    val = data.val or str(Path(data.embedded_dir) / "val")
    return dataclasses.replace(cfg, data=dataclasses.replace(data, train=train, val=val))


def _apply_init_from(cfg: JobConfig):
    """``model.init_from``: the source's architecture (merged into cfg.model) and its weights."""
    if not cfg.model.init_from:
        return cfg, None
    from dist_llm.interop.init_from import check_data_tokenizer, resolve_init_from

    model_cfg, state, tokenizer = resolve_init_from(cfg.model)
    check_data_tokenizer(tokenizer, cfg.data, cfg.model.init_from)
    return dataclasses.replace(cfg, model=model_cfg), state


def _peak_flops(cfg: JobConfig, device) -> float:
    from dist_llm.observability import gpu_peak_flops, measure_cpu_peak_flops

    if cfg.train.ui.peak_flops > 0:
        return cfg.train.ui.peak_flops
    if device.type == "cuda":
        import torch

        dtype = {"fp32": "tf32"}.get(cfg.parallel.precision, cfg.parallel.precision)
        return gpu_peak_flops(torch.cuda.get_device_name(device), dtype) or 0.0
    return measure_cpu_peak_flops(n=512, repeats=7)


def _loaders(cfg: JobConfig, task, layout, plan: RunPlan):
    """This rank's training loader (and the task's data setup) and validation loader (or None)."""
    from dist_llm.data import TrainLoader, ValLoader
    from dist_llm.data.sources import FetchOptions
    from dist_llm.train.tasks.base import TOKENS

    tr = cfg.train
    records = task.sample_format != TOKENS  # BERT pairs / images: the task decodes the samples
    train_loader = TrainLoader.from_config(cfg.data, tr, layout.dp_rank, layout.dp, plan.grad_accum,
                                           fmt=task.sample_format, decode=task.decode_batch if records else None)
    task.setup_data(train_loader.manifest)
    if train_loader.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the training data uses a vocabulary of {train_loader.vocab_size} tokens but "
                         f"model.vocab_size={cfg.model.vocab_size}: set model.vocab_size >= "
                         f"{train_loader.vocab_size}")
    if not (cfg.data.val and tr.eval_every):
        return train_loader, None
    val_loader = ValLoader(cfg.data.val, tr.seq_len, layout.dp_rank, layout.dp, tr.micro_batch_size,
                           tr.eval_batches * tr.global_batch_size, cfg.data.require_checksums,
                           fmt=task.sample_format, decode=task.decode_eval_batch if records else None,
                           fetch=FetchOptions.from_config(cfg.data))
    return train_loader, val_loader


def _callbacks(cfg: JobConfig, task, layout, le: LaunchEnv, run_dir: Path) -> list:
    """The trainer's callbacks, in the order they run."""
    from dist_llm.train.callbacks import CheckpointCallback, EvalLogCallback, MetricsCallback, ProvenanceCallback
    from dist_llm.train.debug import debug_callbacks
    from dist_llm.train.watchdog import WatchdogCallback

    tr = cfg.train
    callbacks = [
        # First: it beats before the other callbacks' work (saves) and before the debug hooks
        # (a fault injected in a phase is reported in that phase).
        WatchdogCallback(tr.hang_timeout_s, cfg.parallel.first_step_timeout_s, cfg.parallel.timeout_s),
        MetricsCallback(task.flops_per_token(cfg), _peak_flops(cfg, layout.device), layout.world_size),
        EvalLogCallback(),
        CheckpointCallback(tr.checkpoint.every, tr.checkpoint.keep_best),
        ProvenanceCallback(le),  # which attempt trained which steps: provenance.json + manifests
        *debug_callbacks(cfg.debug),
    ]
    if tr.profile:
        from dist_llm.train.profiling import ProfilerCallback

        callbacks.append(ProfilerCallback(tr.profile, tr.profile_ranks, layout.rank, run_dir))
    return callbacks


def _requeue(cfg: JobConfig, le: LaunchEnv):
    """How a preempted rank asks Slurm to requeue the job; None outside Slurm."""
    if le.launcher != "slurm" and slurm_job_id() is None:
        return None
    from dist_llm.launch.slurm_requeue import requeue_current_job

    return lambda: requeue_current_job(max_requeues=cfg.launcher.slurm.max_requeues)


def _split_cpu_threads(local_world_size: int) -> None:
    """Without a GPU, split the cores between the local ranks instead of oversubscribing them
    (the cores this process may run on: `taskset -c 0 dist-llm train ...` pins to one thread)."""
    import torch

    if not torch.cuda.is_available():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // max(local_world_size, 1)))


def _engine(cfg: JobConfig, task, layout, init_state):
    """The task's model, the same initial weights on every rank, behind the configured engine."""
    from dist_llm.parallel import build_engine

    _seed_all(cfg.train.seed)  # identical initial weights on every rank
    model = task.build_model(cfg)
    if init_state is not None:  # before the engine: every engine (ZeRO, Megatron TP/PP) takes it from here
        from dist_llm.interop.init_from import load_into

        load_into(model, init_state, cfg.model.init_from)
    engine = build_engine(cfg, model, layout, task=task)
    _seed_all(cfg.train.seed + 1000 * layout.rank)  # independent dropout streams per rank
    return engine


def run_training(cfg: JobConfig, launch_env: Optional[LaunchEnv] = None,
                 plan: Optional[RunPlan] = None) -> Dict[str, Any]:
    """Train on this rank; returns the run summary (same on every rank for the fields that matter).

    ``plan``: the result of ``validate`` when the caller already validated this config for this
    rank's world size (the CLI); otherwise it is validated here, once."""
    le = launch_env or read_launch_env()
    setup_logging(le.rank)
    cfg, init_state = _apply_init_from(cfg)
    if plan is None or plan.world != le.world_size or plan.job_id != le.job_id:
        plan = validate(cfg, le.world_size, le.job_id)

    import torch

    from dist_llm.checkpoint.manager import CheckpointManager
    from dist_llm.observability import build_logger, make_progress
    from dist_llm.parallel.layout import init_layout, shutdown
    from dist_llm.train.tasks import build_task
    from dist_llm.train.trainer import Trainer

    _split_cpu_threads(le.local_world_size)
    task = build_task(cfg)  # before any process group: an unknown kind fails here
    layout = init_layout(cfg.parallel, le)
    try:
        if cfg.data.build_embedded:
            cfg = _prepare_embedded(cfg, layout)
        run_dir = plan.run_dir
        if layout.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        layout.barrier()

        tr = cfg.train
        train_loader, val_loader = _loaders(cfg, task, layout, plan)
        engine = _engine(cfg, task, layout, init_state)

        config_dict = config_to_dict(cfg)
        logger = build_logger(cfg.logging, str(run_dir), run_dir.name, config_dict, layout.is_logging_rank)
        callbacks = _callbacks(cfg, task, layout, le, run_dir)
        if tr.ui.breakdown and layout.device.type == "cuda":
            engine.phase_sync = lambda: torch.cuda.synchronize(layout.device)
        progress = make_progress(tr.max_steps, 0, tr.ui.progress_bar if layout.is_logging_rank else "off")
        trainer = Trainer(cfg, layout, engine, train_loader, val_loader,
                          CheckpointManager(run_dir, layout, tr.checkpoint.keep_last), logger, callbacks,
                          progress, config_dict, plan, requeue=_requeue(cfg, le))
        exit_code = 1
        try:
            summary = trainer.fit()
            if tr.sample.tokens > 0:
                summary["sample"] = _sample(cfg, engine, layout)
            logger.log_summary({k: v for k, v in summary.items() if v is not None})
            exit_code = 0
        finally:
            logger.finish(exit_code=exit_code)
            train_loader.close()
        if layout.rank == 0:
            log.info("run finished: %s", summary)
        return summary
    finally:
        shutdown()


def _sample(cfg: JobConfig, engine, layout) -> Optional[str]:
    """Generate text from the trained weights on rank 0 (full weights: works under ZeRO-3 too)."""
    import json

    import torch

    from dist_llm.data import load_tokenizer
    from dist_llm.models import build_model, generate

    weights = engine.model_state_dict()  # collective
    if layout.rank != 0:
        return None
    from dist_llm.data.sources import FetchOptions, is_url, read_split_manifest

    if is_url(cfg.data.train[0].path):  # the meta is in the split manifest (files of an hf tokenizer are not fetched)
        meta = read_split_manifest(cfg.data.train[0].path, opts=FetchOptions.from_config(cfg.data)).get("tokenizer")
        tok = load_tokenizer(meta or {"kind": "byte"})
    else:
        src = Path(cfg.data.train[0].path)
        meta = json.loads((src / "manifest.json").read_text()).get("tokenizer") or {"kind": "byte"}
        tok = load_tokenizer(meta, src.parent)
    model = build_model(cfg.model)
    model.load_state_dict(weights)
    prompt = torch.tensor([tok.encode(cfg.train.sample.prompt)], dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    out = generate(model, prompt, cfg.train.sample.tokens, temperature=0.8, top_k=40, generator=gen)
    return tok.decode(out[0].tolist())
