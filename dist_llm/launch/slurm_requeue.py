"""Requeue the current Slurm job after a preemption checkpoint.

The trainer calls :func:`requeue_current_job` on rank 0 once the committed checkpoint is on
disk, then every rank exits with ``EXIT_PREEMPTED``. The job must have been submitted with
``--requeue`` (the rendered sbatch script does that); Slurm then starts it again with the same
job id and ``SLURM_RESTART_COUNT`` + 1, and ``train.checkpoint.resume=auto`` picks up the
checkpoint.

``scontrol`` is run as an argument list (never through a shell) and the job id is checked with
a full match first, so nothing from the environment can turn into a command.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from typing import Callable, Mapping, Optional

from dist_llm.launch.env import slurm_job_id

log = logging.getLogger(__name__)

# A plain job id ("1234") or an array task ("1234_7"); nothing else is passed to scontrol.
JOB_ID_RE = re.compile(r"[0-9]+(?:_[0-9]+)?")
DEFAULT_MAX_REQUEUES = 3
MAX_REQUEUES_ENV = "DIST_LLM_MAX_REQUEUES"


def current_job_id(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The id to requeue: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``.

    Returns None when not running under Slurm. Raises ValueError for a malformed id.
    """
    job_id = slurm_job_id(env)
    if not job_id:
        return None
    if not JOB_ID_RE.fullmatch(job_id):
        raise ValueError(f"slurm_requeue: refusing malformed Slurm job id {job_id!r}")
    return job_id


def _max_requeues(env: Mapping[str, str], max_requeues: Optional[int]) -> int:
    if max_requeues is not None:
        return int(max_requeues)
    raw = env.get(MAX_REQUEUES_ENV, "")
    if raw.strip():
        try:
            return int(raw)
        except ValueError:
            log.warning("slurm_requeue: %s=%r is not an integer; using %d",
                        MAX_REQUEUES_ENV, raw, DEFAULT_MAX_REQUEUES)
    return DEFAULT_MAX_REQUEUES


def _job_state(job_id: str, runner, timeout_s: float) -> Optional[str]:
    """``JobState`` from ``scontrol show job`` (None if it cannot be read)."""
    try:
        proc = runner(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                      timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\bJobState=(\S+)", getattr(proc, "stdout", "") or "")
    return m.group(1) if m else None


def requeue_current_job(env: Optional[Mapping[str, str]] = None,
                        runner: Callable[..., "subprocess.CompletedProcess"] = subprocess.run,
                        max_requeues: Optional[int] = None,
                        timeout_s: float = 60.0) -> bool:
    """Ask Slurm to requeue this job; returns True when ``scontrol requeue`` succeeded.

    Returns False (and logs why) when not under Slurm, when the job id is malformed, when the
    job has already been restarted ``max_requeues`` times (argument, else
    ``$DIST_LLM_MAX_REQUEUES``, else 3; a negative cap means unlimited), when ``scontrol show
    job`` says the job is not RUNNING (``scancel`` also sends SIGTERM and leaves the job
    COMPLETING: a cancelled job must not come back), or when scontrol fails.
    Never raises for those cases: the caller still exits with ``EXIT_PREEMPTED`` and the
    checkpoint is kept, so a manual resubmit resumes from it.
    """
    env = os.environ if env is None else env
    try:
        job_id = current_job_id(env)
    except ValueError as e:
        log.error("%s", e)
        return False
    if job_id is None:
        log.info("slurm_requeue: not running under Slurm (no SLURM_JOB_ID); not requeueing")
        return False

    cap = _max_requeues(env, max_requeues)
    raw_count = env.get("SLURM_RESTART_COUNT", "0") or "0"
    try:
        restarts = int(raw_count)
    except ValueError:
        log.warning("slurm_requeue: SLURM_RESTART_COUNT=%r is not an integer; treating as 0", raw_count)
        restarts = 0
    if cap >= 0 and restarts >= cap:
        log.warning("slurm_requeue: job %s was already restarted %d time(s) (cap %d); not requeueing. "
                    "Resubmit by hand to resume from the last checkpoint.", job_id, restarts, cap)
        return False

    state = _job_state(job_id, runner, timeout_s)
    if state is not None and state != "RUNNING":
        # `scancel` sends SIGTERM, which the trainer also treats as a preemption; the job is then
        # COMPLETING/CANCELLED and must stay cancelled (Slurm would accept the requeue and run it
        # again). A scheduler preemption (PreemptMode=REQUEUE) requeues the job by itself.
        log.warning("slurm_requeue: job %s is %s, not RUNNING (cancelled, or already being ended or "
                    "requeued by Slurm); not requeueing", job_id, state)
        return False

    cmd = ["scontrol", "requeue", job_id]
    try:
        proc = runner(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        log.error("slurm_requeue: %s failed to run: %s", " ".join(cmd), e)
        return False
    rc = getattr(proc, "returncode", 1)
    if rc != 0:
        log.error("slurm_requeue: %s exited %s: %s", " ".join(cmd), rc,
                  (getattr(proc, "stderr", "") or "").strip())
        return False
    log.warning("slurm_requeue: requeued job %s (restart %d of at most %s)", job_id, restarts + 1,
                cap if cap >= 0 else "unlimited")
    return True
