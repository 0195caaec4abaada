"""The launch contract: who am I, how many are we, and where is rank 0.

Reads rank, world size, local rank, node rank, master address and port from whichever launcher
started this process. Precedence: ``RANK``/``WORLD_SIZE`` set (torchrun, our local mock cluster,
and Ray Train workers, whose backend sets them), then Slurm (``SLURM_PROCID`` under ``srun``),
then a plain single process. Nothing here touches torch.distributed; it only reads the
environment. The job id (part of the run directory name) is read by :func:`job_id_from_env`,
the one place that parses it.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

# Exit code of a job that saved a checkpoint because it was preempted (or hit its time limit)
# and asked to be requeued. Distinct from failure codes so wrappers can tell the two apart.
EXIT_PREEMPTED = 85


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | local | slurm | ray | single
    job_id: Optional[str] = None  # Slurm or Ray job id: part of the run directory name

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], key: str, default: Optional[int] = None) -> int:
    value = env.get(key)
    if value is None or value == "":
        if default is None:
            raise RuntimeError(f"launch: environment variable {key} is not set but the launcher needs it")
        return default
    try:
        return int(value)
    except ValueError as e:
        raise RuntimeError(f"launch: {key}={value!r} is not an integer") from e


def expand_first_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``node[03-05,7],gpu1`` -> ``node03``.

    Slurm compresses host lists; ``scontrol show hostnames`` would expand them but is not
    always on the compute node's PATH, so the (simple) grammar is parsed here.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise RuntimeError("launch: SLURM_JOB_NODELIST is empty")
    # The first comma at bracket depth 0 ends the first host expression.
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    lo = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{lo}{suffix}"


def port_from_job_id(job_id: str, base: int = 20000, span: int = 20000) -> int:
    """A master port every rank of a job derives alike, and that differs between jobs."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return base + int(digits) % span


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_job_id(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``<array job>_<task>`` for a Slurm array task, else ``SLURM_JOB_ID`` (``SLURM_JOBID`` on
    old Slurm); None outside Slurm. Not checked here: callers that pass it on check it."""
    env = os.environ if env is None else env
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or None


def job_id_from_env(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The job id of this run: Slurm's, else ``DIST_LLM_JOB_ID`` (Ray jobs set it); None when
    neither is set (a local run)."""
    env = os.environ if env is None else env
    return slurm_job_id(env) or env.get("DIST_LLM_JOB_ID") or None


def read_launch_env(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Map the launcher's variables onto one :class:`LaunchEnv`."""
    env = os.environ if env is None else env
    job_id = job_id_from_env(env)

    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        rank = _int(env, "RANK")
        return LaunchEnv(
            rank=rank,
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK", rank),
            local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK", rank // max(local_world, 1)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", 29500),
            launcher=env.get("DIST_LLM_LAUNCHER", "torchrun"),
            job_id=job_id,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int(env, "SLURM_NTASKS")
        nodes = _int(env, "SLURM_NNODES", 1)
        local_world = _int(env, "SLURM_NTASKS_PER_NODE", world // max(nodes, 1)) if env.get(
            "SLURM_NTASKS_PER_NODE", "").isdigit() else max(world // max(nodes, 1), 1)
        job = env.get("SLURM_JOB_ID", "0")
        return LaunchEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", 0),
            local_world_size=local_world,
            node_rank=_int(env, "SLURM_NODEID", 0),
            master_addr=env.get("MASTER_ADDR") or expand_first_host(env.get("SLURM_JOB_NODELIST", "")),
            master_port=_int(env, "MASTER_PORT", port_from_job_id(job)),
            launcher="slurm",
            job_id=job_id,
        )
    return LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                     master_addr="127.0.0.1", master_port=_int(env, "MASTER_PORT", 29500),
                     launcher="single", job_id=job_id)


def export_torch_env(le: LaunchEnv, env: Optional[dict] = None) -> None:
    """Write the torchrun-style variables that ``init_process_group(init_method='env://')``
    and DeepSpeed read, so every launcher looks like torchrun from here on."""
    env = os.environ if env is None else env
    env.update({
        "RANK": str(le.rank), "WORLD_SIZE": str(le.world_size), "LOCAL_RANK": str(le.local_rank),
        "LOCAL_WORLD_SIZE": str(le.local_world_size), "MASTER_ADDR": le.master_addr,
        "MASTER_PORT": str(le.master_port),
    })
