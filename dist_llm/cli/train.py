"""``dist-llm train``: compose the Hydra config, validate it, then run or launch the ranks."""
from __future__ import annotations

import json
import os
import sys
from typing import List

from dist_llm.config.store import default_config_dir, register_configs, to_job_config
from dist_llm.config.validate import ConfigError, planned_world_size, validate
from dist_llm.interop import InteropError
from dist_llm.launch.env import job_id_from_env

_exit_code = 0


def _train_task(dcfg) -> None:
    """Runs once per Hydra job (once, or once per point of a ``-m`` sweep)."""
    global _exit_code
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    cfg = to_job_config(dcfg)
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        cfg.name = f"{cfg.name}-{hc.job.num}"  # one run directory per sweep point, never a timestamp
    try:
        if cfg.model.init_from:  # the source's architecture, so validation sees the real sizes
            from dist_llm.interop.init_from import derive_model_config

            cfg.model = derive_model_config(cfg.model)
        plan = validate(cfg, planned_world_size(cfg), job_id_from_env())
    except (ConfigError, InteropError) as e:
        print(f"dist-llm train: {e}", file=sys.stderr)
        _exit_code = 2
        return
    _exit_code = launch(cfg, plan) or _exit_code


def launch(cfg, plan) -> int:
    """Start the job ``plan`` (validate's result for this config) describes."""
    # The local launcher runs ranks as child processes even for nproc=1: a sweep then trains each
    # point in a fresh process (DeepSpeed keeps process-group state in module globals) and a
    # crashed rank cannot take the launcher down with it.
    if cfg.launcher.kind == "local" and "RANK" not in os.environ:
        from dist_llm.launch.local import spawn_local
        from dist_llm.observability.redact import save_config_redacted

        run_dir = plan.run_dir  # the ranks inherit this environment, so they derive the same one
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "config.yaml"
        save_config_redacted(cfg, path)
        code = spawn_local(cfg.launcher.nproc, ["-m", "dist_llm.cli.main", "worker", str(path)],
                           cfg.launcher.master_port)
        if code == 0 and (run_dir / "summary.json").is_file():
            print_summary(json.loads((run_dir / "summary.json").read_text()))
        return code
    if cfg.launcher.kind == "ray" and "RANK" not in os.environ:
        # The driver of a Ray job: Ray Train starts the ranks (and restarts them on failure).
        from dist_llm.submit.ray_job import train_with_ray

        return 0 if train_with_ray(cfg).error is None else 1
    return _run_here(cfg, plan)


def _run_here(cfg, plan=None) -> int:
    """Train as this process's rank. ``plan`` is the CLI's validation result; run_training
    reuses it when this rank's world size and job id match, so the config is validated once."""
    from dist_llm.train.run import run_training
    from dist_llm.train.trainer import Preempted

    try:
        summary = run_training(cfg, plan=plan)
    except Preempted as e:
        return int(e.code)
    if cfg.launcher.kind != "local" and os.environ.get("RANK", "0") == "0":
        print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    """The run's outcome for a person: JSON (machine-readable) plus the lines one looks for."""
    sample = summary.get("sample")
    print(json.dumps({k: v for k, v in summary.items() if k != "sample"}, indent=1, default=str))
    first, last = summary.get("first_val_loss"), summary.get("val_loss")
    if first and last:
        print(f"validation loss {first:.4f} -> {last:.4f} ({100 * (last - first) / first:+.1f}%)")
    if summary.get("best_checkpoint"):
        print(f"best model (val loss {summary['best_val_loss']:.4f} at step {summary['best_step']}): "
              f"{summary['best_checkpoint']}")
    if sample:
        print("--- sample ---")
        print(sample)


def train_cli(args: List[str]) -> int:
    import hydra

    register_configs()
    sys.argv = ["dist-llm train", *args]
    main = hydra.main(version_base="1.3", config_path=default_config_dir(), config_name="config")(_train_task)
    main()
    return _exit_code


def worker_main(args: List[str]) -> int:
    """One rank of the local mock cluster: the config was composed and validated by the parent."""
    from dist_llm.config.store import job_config_from_yaml

    if len(args) != 1:
        print("usage: dist-llm worker <resolved config.yaml>", file=sys.stderr)
        return 2
    return _run_here(job_config_from_yaml(args[0]))
