"""Fixtures that bring up a real local Slurm cluster and a real local Ray cluster.

Tests marked ``slurm`` use ``slurm_cluster``: an already running cluster (``sinfo`` answers
with idle nodes) is used as is; otherwise ``tests/cluster/start_local_slurm.sh`` installs
(Debian packages, needs root + apt) and starts slurmctld + 2 slurmd fake nodes on 127.0.0.1,
and the session stops it again at the end. Where that cannot work the tests SKIP with the
reason. ``DIST_LLM_SLURM=skip`` skips them on purpose; ``DIST_LLM_SLURM=require`` turns a
failure to start into an error (CI, where the cluster must exist).

Tests marked ``ray`` use ``ray_cluster``: ``ray_jobs/start_local_cluster.sh`` on 127.0.0.1
with 2 CPUs in a private temp dir, stopped at the end. ``DIST_LLM_RAY=skip|require`` likewise.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def pytest_configure(config):
    # Registered here as well as in pyproject.toml so the markers work from any rootdir.
    config.addinivalue_line("markers", "slurm: needs a real local Slurm cluster (tests/cluster/start_local_slurm.sh)")
    config.addinivalue_line("markers", "ray: needs a real local Ray cluster (ray_jobs/start_local_cluster.sh)")


def _mode(var: str) -> str:
    return os.environ.get(var, "auto").strip().lower()


def _unavailable(var: str, reason: str):
    if _mode(var) == "require":
        pytest.fail(f"{var}=require but: {reason}", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        return False
    states = [line.split()[1] for line in r.stdout.splitlines() if len(line.split()) == 2]
    return sum(s.rstrip("*") in ("idle", "mix", "alloc") for s in states) >= 2


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running local Slurm cluster with >= 2 nodes; yields the node count."""
    if _mode("DIST_LLM_SLURM") == "skip":
        pytest.skip("DIST_LLM_SLURM=skip")
    started = False
    if not _slurm_up():
        if os.geteuid() != 0:
            _unavailable("DIST_LLM_SLURM", "no local Slurm cluster running, and starting one needs root")
        have_pkgs = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
        if not have_pkgs and not shutil.which("apt-get"):
            _unavailable("DIST_LLM_SLURM", "Slurm is not installed and there is no apt-get to install it")
        t0 = time.time()
        r = subprocess.run(["bash", str(HERE / "start_local_slurm.sh")], capture_output=True, text=True,
                           timeout=600, env={**os.environ, "SLURM_LOCAL_NODES": "2", "SLURM_LOCAL_CPUS": "4"})
        if r.returncode != 0 or not _slurm_up():
            _unavailable("DIST_LLM_SLURM", f"start_local_slurm.sh failed (rc {r.returncode}): "
                         f"{(r.stderr or r.stdout)[-2000:]}")
        print(f"[slurm_cluster] started in {time.time() - t0:.1f}s", file=sys.stderr)
        started = True
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True)
    yield len(set(r.stdout.split()))
    if started and os.environ.get("DIST_LLM_KEEP_SLURM") != "1":
        subprocess.run(["bash", str(HERE / "stop_local_slurm.sh")], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray head on 127.0.0.1 with 2 CPUs; yields a dict with ``address`` (GCS),
    ``dashboard`` (job submission URL) and ``env`` (RAY_* variables a client needs)."""
    if _mode("DIST_LLM_RAY") == "skip":
        pytest.skip("DIST_LLM_RAY=skip")
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists() and not shutil.which("ray"):
        _unavailable("DIST_LLM_RAY", "the `ray` command is not installed (pip install 'ray[train]')")
    state = Path(tempfile.mkdtemp(prefix="dist-llm-ray-"))
    env = {**os.environ, "RAY_LOCAL_DIR": str(state), "RAY_LOCAL_CPUS": "2",
           "RAY_LOCAL_PORT": str(_free_port()), "RAY_LOCAL_DASHBOARD_PORT": str(_free_port()),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    t0 = time.time()
    r = subprocess.run(["bash", str(REPO / "ray_jobs" / "start_local_cluster.sh")], capture_output=True,
                       text=True, timeout=300, env=env)
    if r.returncode != 0:
        subprocess.run(["bash", str(REPO / "ray_jobs" / "stop_local_cluster.sh")], capture_output=True,
                       env=env, timeout=120)
        _unavailable("DIST_LLM_RAY", f"start_local_cluster.sh failed (rc {r.returncode}): "
                     f"{(r.stderr or r.stdout)[-2000:]}")
    print(f"[ray_cluster] started in {time.time() - t0:.1f}s", file=sys.stderr)
    info = {}
    for line in (state / "cluster.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            info[k.strip().removeprefix("export ").strip()] = v.strip().strip("'\"")
    try:
        yield {"address": info["RAY_GCS_ADDRESS"], "dashboard": info["RAY_ADDRESS"], "env": info,
               "state_dir": state}
    finally:
        subprocess.run(["bash", str(REPO / "ray_jobs" / "stop_local_cluster.sh")], capture_output=True,
                       env=env, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
