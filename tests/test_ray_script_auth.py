"""Issue 9, Fix 8: ray_jobs/start_local_cluster.sh refuses a Ray without token authentication
instead of silently starting an open job API (no cluster needed: the script runs against a
stand-in `ray` command that answers like Ray 2.40, and records whether `ray start` was called)."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

OLD_RAY = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/calls.log"
case "$1" in
  --version) echo "ray, version 2.40.0" ;;
  get-auth-token) echo "Usage: ray [OPTIONS] COMMAND [ARGS]...  Error: No such command 'get-auth-token'." >&2; exit 2 ;;
  *) exit 0 ;;
esac
"""


def _run(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    ray = tmp_path / "bin" / "ray"
    ray.parent.mkdir(exist_ok=True)
    ray.write_text(OLD_RAY)
    ray.chmod(ray.stat().st_mode | stat.S_IEXEC)
    e = {**os.environ, "RAY": str(ray), "RAY_LOCAL_DIR": str(tmp_path / "state"), "RAY_LOCAL_PORT": "1",
         "RAY_LOCAL_DASHBOARD_PORT": "2", "RAY_LOCAL_TIMEOUT": "1", **env}
    return subprocess.run(["bash", str(REPO / "ray_jobs" / "start_local_cluster.sh")], env=e,
                          capture_output=True, text=True, timeout=60)


def test_old_ray_is_refused_before_anything_starts(tmp_path):
    r = _run(tmp_path)
    assert r.returncode != 0
    assert "has no token authentication (needs ray >= 2.52)" in r.stderr and "2.40.0" in r.stderr
    assert "RAY_LOCAL_AUTH=disabled" in r.stderr  # says the explicit way out
    calls = (tmp_path / "bin" / "calls.log").read_text()
    assert "start" not in calls.split() and not (tmp_path / "state" / "ray.pid").exists()


def test_auth_off_only_when_asked_and_then_said_loudly(tmp_path):
    r = _run(tmp_path, RAY_LOCAL_AUTH="disabled")
    assert "WARNING: token authentication off (RAY_LOCAL_AUTH=disabled)" in r.stdout + r.stderr
    assert "start --head" in (tmp_path / "bin" / "calls.log").read_text()


def test_pyproject_floor_has_token_auth():
    text = (REPO / "pyproject.toml").read_text()
    assert '"ray[default,train,serve]>=2.52,' in text
