"""Ray: train with a Ray Train ``TorchTrainer`` and submit jobs to a Ray cluster.

:func:`train_with_ray` runs on the Ray driver (``dist-llm train launcher=ray``, which is also the
entrypoint of a submitted Ray job). Each Ray Train worker is one rank and runs the same
:func:`dist_llm.train.run.run_training` as every other launcher; Ray Train has already started
the torch process group (gloo on CPU, nccl on GPU) and set ``RANK``/``WORLD_SIZE``/``MASTER_*``.

Fault tolerance: ``FailureConfig(max_failures)``. When a worker dies, Ray tears the group down
and starts it again; every worker then calls ``run_training`` again with ``train.checkpoint.resume=auto``
and the same job id, so it resumes from the run directory's latest committed checkpoint. The
run directory (``<output_dir>/<name>-<job id>``) must therefore be on storage all workers see.

:func:`submit_ray_job` submits ``python -m dist_llm.cli.main train <overrides> launcher=ray``
through Ray's job submission API (address from ``launcher.ray.address`` or ``RAY_ADDRESS``).
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from dist_llm.config.plan import run_dir_for
from dist_llm.config.schema import JobConfig
from dist_llm.launch.ray_connect import init_ray

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_ID_ENV = "DIST_LLM_JOB_ID"
# Never uploaded with the working directory (Ray caps a working_dir package at a few hundred MB).
# gitignore syntax: a leading "/" anchors at the working dir (plain "data" would also drop dist_llm/data).
WORKING_DIR_EXCLUDES = ["/.git", "/.venv", "/venv", "/runs", "/outputs", "/multirun", "/data", "/wandb",
                        "__pycache__", "*.egg-info", ".pytest_cache", "/.whl", "/.gl", "*.pt", "*.safetensors"]
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def new_job_id() -> str:
    """A run id for a Ray run: sortable, unique, and safe in a directory name."""
    return time.strftime("ray%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def absolutize_paths(cfg: JobConfig, base: Optional[str] = None) -> JobConfig:
    """Make the config's filesystem paths absolute (Ray workers do not share the driver's cwd)."""
    base_p = Path(base or os.getcwd())

    def ab(p: Optional[str]) -> Optional[str]:
        if not p or "://" in p or p.startswith("pipe:"):  # URLs and commands stay as given
            return p
        return str(p if os.path.isabs(p) else (base_p / p).resolve())

    data = cfg.data
    data = dataclasses.replace(
        data, embedded_dir=ab(data.embedded_dir), val=ab(data.val),
        train=[dataclasses.replace(s, path=ab(s.path)) for s in data.train])
    return dataclasses.replace(cfg, output_dir=ab(cfg.output_dir), data=data)


def _train_loop_per_worker(loop_cfg: Dict[str, Any]) -> None:
    """One Ray Train worker = one rank. Imports inside: this runs in the worker process."""
    os.environ[JOB_ID_ENV] = loop_cfg["job_id"]
    os.environ["DIST_LLM_LAUNCHER"] = "ray"
    import ray.train

    from omegaconf import OmegaConf

    from dist_llm.config.store import to_job_config
    from dist_llm.train.run import run_training

    cfg = to_job_config(OmegaConf.create(loop_cfg["config"]))
    summary = run_training(cfg)
    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
    ray.train.report(metrics)


def train_with_ray(cfg: JobConfig, job_id: Optional[str] = None):
    """Train ``cfg`` with ``cfg.launcher.ray.num_workers`` Ray Train workers; returns the
    ``ray.train.Result`` (``result.metrics`` = the run summary of rank 0)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dist_llm.config.store import config_to_dict
    from dist_llm.observability.redact import save_config_redacted

    la = cfg.launcher.ray
    cfg = absolutize_paths(cfg)
    job_id = job_id or os.environ.get(JOB_ID_ENV) or new_job_id()
    run_dir = run_dir_for(cfg.output_dir, cfg.name, job_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    save_config_redacted(cfg, config_path)

    address = la.address if la.address and not la.address.startswith(("http://", "https://")) else None
    init_ray(address, "launcher.ray.address", log_to_driver=True)

    use_gpu = la.gpus_per_worker > 0
    resources = {"CPU": float(la.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(la.gpus_per_worker)
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if use_gpu else "gloo")
    trainer = TorchTrainer(
        train_loop_per_worker=_train_loop_per_worker,
        train_loop_config={"job_id": job_id, "config": config_to_dict(cfg)},
        torch_config=TorchConfig(backend=backend, timeout_s=cfg.parallel.timeout_s),
        scaling_config=ScalingConfig(num_workers=la.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{run_dir.name}.ray",  # Ray Train's own bookkeeping, next to the run directory
            storage_path=str(Path(cfg.output_dir).resolve()),
            failure_config=FailureConfig(max_failures=la.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=max(cfg.train.checkpoint.keep_last, 1)),
        ),
    )
    print(f"[dist-llm] Ray Train: {la.num_workers} worker(s), run directory {run_dir}", file=sys.stderr)
    return trainer.fit()


# ---------------------------------------------------------------- job submission
def training_entrypoint(overrides: Sequence[str], python: str = "python") -> str:
    """The shell command of the Ray job (Ray runs entrypoints through a shell: every override is
    quoted)."""
    from dist_llm.submit.slurm import training_overrides

    args = [python, "-m", "dist_llm.cli.main", "train", *training_overrides(overrides, "ray")]
    return " ".join(shlex.quote(a) for a in args)


def resolve_address(cfg: JobConfig, address: Optional[str] = None) -> str:
    addr = address or cfg.launcher.ray.address or os.environ.get("RAY_ADDRESS")
    if not addr:
        raise ValueError("no Ray cluster address: pass launcher.ray.address=http://<head>:8265 or set RAY_ADDRESS "
                         "(ray_jobs/start_local_cluster.sh prints it for a local cluster)")
    if "://" not in addr:
        addr = f"http://{addr}"
    return addr


def _is_local(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in _LOCAL_HOSTS


def submit_ray_job(cfg: JobConfig, overrides: Sequence[str], address: Optional[str] = None,
                   dry_run: bool = False, working_dir: Optional[str] = None,
                   env_vars: Optional[Dict[str, str]] = None, python: str = "python",
                   client=None, stdout=None) -> str:
    """Submit the training job to a running Ray cluster; returns the submission id.

    The working directory (default: this repository, without ``.venv``, ``runs``, ``data``...)
    is uploaded as the job's runtime environment; the run is keyed by a job id passed to the
    driver as ``DIST_LLM_JOB_ID``. ``output_dir`` must be storage every Ray node sees: a
    relative one is made absolute for a cluster on this machine and rejected for a remote one.
    """
    from dist_llm.submit.slurm import check_overrides

    overrides = check_overrides(overrides)
    addr = resolve_address(cfg, address)
    job_id = new_job_id()
    extra: List[str] = []
    if not os.path.isabs(cfg.output_dir) and "://" not in cfg.output_dir:
        if not _is_local(addr):
            raise ValueError(f"output_dir={cfg.output_dir!r} is relative; a Ray job on {addr} runs in a copy of "
                             f"the working directory, so its checkpoints would be lost: set output_dir to "
                             f"a path on storage every Ray node sees (e.g. output_dir=/shared/runs)")
        extra.append(f"output_dir={Path(cfg.output_dir).resolve()}")
    entrypoint = training_entrypoint([*overrides, *extra], python=python)
    runtime_env = {
        "working_dir": str(working_dir or REPO_ROOT),
        "excludes": WORKING_DIR_EXCLUDES,
        "env_vars": {JOB_ID_ENV: job_id, "PYTHONUNBUFFERED": "1", **(env_vars or {})},
    }
    submission_id = f"dist-llm-{cfg.name}-{job_id}"
    out = stdout or sys.stdout
    if dry_run:
        print(f"address: {addr}\nsubmission_id: {submission_id}\nentrypoint: {entrypoint}\n"
              f"runtime_env: {runtime_env}", file=out)
        return submission_id
    if client is None:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(addr)
    sid = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                            entrypoint_num_cpus=0)
    run_dir = run_dir_for(str(Path(cfg.output_dir).resolve()) if extra else cfg.output_dir, cfg.name, job_id)
    print(f"submitted Ray job {sid} to {addr}; run directory {run_dir}\n"
          f"  follow it: ray job logs --follow --address {addr} {sid}", file=sys.stderr)
    return sid
