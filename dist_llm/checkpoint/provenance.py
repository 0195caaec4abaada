"""Provenance: which code, packages, config, data and allocation trained which steps.

Each start of a training job (an *attempt*: the first launch, a Slurm requeue, a torchrun
restart, a manual resume) builds one record: the code revision of the installed ``dist_llm``
source tree and whether it had uncommitted changes, package versions, the resolved config
(redacted; stored once per distinct sha256), the sha256 of the data manifests and the launch
environment (world, nodes, hosts, job ids, restart counters). Attempts accumulate:

* ``<run_dir>/provenance.json`` (rank 0, atomic) lists every attempt ever started in the run
  directory, with the steps it trained (``first_step``..``last_step``, updated at each save and
  at exit) and how it ``ended`` (completed | preempted | crashed | unknown: it never reported,
  e.g. kill -9 or a lost node), plus the ``lineage`` of the newest state.
* every checkpoint's ``manifest.json`` gets a ``provenance`` entry: the lineage up to that save,
  i.e. the attempts whose updates are in those weights, each cut at the step where the next one
  resumed. A checkpoint alone tells which attempt trained which of its steps.

A resumed attempt takes its lineage from the resumed checkpoint's manifest (the truth at that
step: steps an earlier attempt trained past that checkpoint were thrown away), and merges in
what the run directory knows about those attempts (how they ended). Attempt numbers count every
start in the run directory, so an attempt whose work was discarded leaves a gap in a lineage.

Nothing here may fail a run: no git, no repository, a timeout or an unreadable file gives
"unknown" (and a warning), never an exception.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from dist_llm.fileio import sha256_file, write_private
from dist_llm.launch.env import LaunchEnv
from dist_llm.observability.redact import redact

log = logging.getLogger("dist_llm.checkpoint")

FORMAT = "dist-llm-provenance/1"
PROVENANCE_FILE = "provenance.json"
UNKNOWN = "unknown"
PACKAGES = ("torch", "deepspeed", "megatron-core", "transformers", "webdataset", "numpy", "safetensors",
            "dist-llm")
# Launcher variables worth keeping (ids and counters only: never values that could hold secrets).
ENV_KEYS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
            "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_CLUSTER_NAME", "TORCHELASTIC_RESTART_COUNT",
            "TORCHELASTIC_RUN_ID", "GROUP_WORLD_SIZE", "RAY_JOB_ID", "DIST_LLM_JOB_ID")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- the record of one attempt ------------------------------------------------------------------
def _git(args: Sequence[str], cwd: Path, git: str, timeout_s: float) -> Optional[str]:
    """stdout of one git command, or None when git is missing, fails or times out."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0", LC_ALL="C")  # status must not write the index
    try:
        proc = subprocess.run([git, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def code_revision(source: Optional[Path] = None, git: str = "git", timeout_s: float = 5.0) -> Dict[str, Any]:
    """``{"revision", "dirty"}`` of the git work tree holding ``source`` (default: this package).

    The package must be *tracked* by that repository: a virtualenv inside some checkout (ignored
    there) is not that checkout's code. ``dirty``: tracked files differ from the commit
    (untracked files do not count). Without git or a repository: ``revision="unknown"``,
    ``dirty=None`` and ``reason`` says why.
    """
    pkg = Path(source) if source is not None else Path(__file__).resolve().parents[1]
    where = pkg if pkg.is_dir() else pkg.parent
    if _git(["ls-files", "--error-unmatch", "--", str(pkg)], where, git, timeout_s) is None:
        return {"revision": UNKNOWN, "dirty": None,
                "reason": f"{pkg} is not in a git work tree (or git is not available)"}
    head = _git(["rev-parse", "HEAD"], where, git, timeout_s)
    if not head:
        return {"revision": UNKNOWN, "dirty": None, "reason": f"git rev-parse HEAD failed in {where}"}
    status = _git(["status", "--porcelain", "--untracked-files=no"], where, git, timeout_s)
    return {"revision": head.strip(), "dirty": None if status is None else bool(status.strip())}


def package_versions() -> Dict[str, str]:
    """Installed versions from package metadata (nothing is imported; absent ones are left out)."""
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _fingerprint(path: str) -> Dict[str, Any]:
    """sha256 of one data source's manifest.json; remote sources (URLs, ``pipe:``) are not read."""
    local = path[len("file://"):] if path.startswith("file://") else path
    if "://" in local or local.startswith("pipe:"):
        return {"path": path, "manifest_sha256": None, "reason": "remote source: not read for provenance"}
    manifest = Path(local) / "manifest.json"
    try:
        return {"path": path, "manifest_sha256": sha256_file(manifest)}
    except OSError as e:
        return {"path": path, "manifest_sha256": None, "reason": f"cannot read {manifest}: {e.strerror}"}


def data_fingerprints(train: Sequence[Any], val: Optional[str]) -> Dict[str, Any]:
    """``train``: the sources (objects with ``path`` and ``weight``); ``val``: a path or None."""
    sources = [{**_fingerprint(str(s.path)), "weight": float(s.weight)} for s in train]
    return {"train": sources, "val": _fingerprint(str(val)) if val else None}


def _int_or_none(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def launch_record(le: LaunchEnv, hostnames: Sequence[str] = (), env: Optional[Mapping[str, str]] = None
                  ) -> Dict[str, Any]:
    """The allocation: world, nodes, distinct hosts (``hostnames``: one per rank, gathered by the
    caller), job ids and the launchers' restart counters."""
    env = os.environ if env is None else env
    nodes = (_int_or_none(env.get("SLURM_JOB_NUM_NODES")) or _int_or_none(env.get("SLURM_NNODES"))
             or _int_or_none(env.get("GROUP_WORLD_SIZE"))
             or -(-le.world_size // max(le.local_world_size, 1)))
    return {
        "launcher": le.launcher, "world_size": le.world_size, "local_world_size": le.local_world_size,
        "nodes": nodes, "hosts": len(set(hostnames)) or None, "host_rank0": hostnames[0] if hostnames else None,
        "job_id": le.job_id,
        "slurm_restart_count": _int_or_none(env.get("SLURM_RESTART_COUNT")),
        "torchelastic_restart_count": _int_or_none(env.get("TORCHELASTIC_RESTART_COUNT")),
        "env": {k: env[k] for k in ENV_KEYS if env.get(k)},
    }


def config_fingerprint(config: Mapping[str, Any]) -> tuple[str, Dict[str, Any]]:
    """(sha256 of the redacted config as canonical JSON, the redacted config)."""
    clean = redact(dict(config))
    blob = json.dumps(clean, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest(), clean


def attempt_record(config: Mapping[str, Any], data: Dict[str, Any], launch: Dict[str, Any],
                   code: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Everything about one attempt but its steps and its end (the ledger adds those)."""
    config_sha, _ = config_fingerprint(config)
    return {"code": code if code is not None else code_revision(), "versions": package_versions(),
            "config_sha256": config_sha, "data": data, "launch": launch}


# --- attempts across restarts -------------------------------------------------------------------
def _read_json(path: Path, what: str) -> Optional[Dict[str, Any]]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("provenance: ignoring %s (%s): %s", path, what, e)
        return None
    return value if isinstance(value, dict) else None


def _attempts(doc: Optional[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    items = (doc or {}).get("attempts")
    return [dict(a) for a in items if isinstance(a, dict)] if isinstance(items, list) else []


def _key(attempt: Mapping[str, Any]) -> tuple:
    return attempt.get("attempt"), attempt.get("started_at")


class Ledger:
    """The attempts of a run directory and the lineage of its newest state (rank 0 keeps one)."""

    def __init__(self, run_dir: Path, history: List[Dict[str, Any]], lineage: List[Dict[str, Any]],
                 current: Dict[str, Any], configs: Dict[str, Any]):
        self.path = Path(run_dir) / PROVENANCE_FILE
        self.history, self.lineage, self.current, self.configs = history, lineage, current, configs

    @classmethod
    def start(cls, run_dir: Path, record: Dict[str, Any], config: Mapping[str, Any], step: int,
              resumed_from: Optional[Path] = None, started_at: Optional[str] = None) -> "Ledger":
        """A new attempt that starts at ``step`` (0, or the step of ``resumed_from``)."""
        run_dir = Path(run_dir)
        previous = _read_json(run_dir / PROVENANCE_FILE, "the run directory's provenance")
        history = _attempts(previous)
        for a in history:  # started before this one and never reported its end
            a["ended"] = a.get("ended") or UNKNOWN
        lineage = cls._resumed_lineage(resumed_from, step)
        known = {_key(a): a for a in history}
        for a in lineage:
            seen = known.get(_key(a))
            if seen is not None:  # the run dir knows how it ended (after this checkpoint was saved)
                a["ended"], a["ended_at"] = a.get("ended") or seen.get("ended"), seen.get("ended_at")
        if not history:  # resumed from another run dir, or provenance.json was lost
            history = [dict(a) for a in lineage if a.get("attempt") is not None]
        numbers = [a["attempt"] for a in history + lineage if isinstance(a.get("attempt"), int)]
        config_sha, clean = config_fingerprint(config)
        configs = {**((previous or {}).get("configs") or {}), config_sha: clean}
        current = {"attempt": max(numbers, default=-1) + 1, "started_at": started_at or now_iso(),
                   "ended": None, "ended_at": None,
                   "resumed_from": {"checkpoint": str(resumed_from), "step": step} if resumed_from else None,
                   "first_step": step + 1, "last_step": step, **record}
        return cls(run_dir, history, lineage, current, configs)

    @staticmethod
    def _resumed_lineage(resumed_from: Optional[Path], step: int) -> List[Dict[str, Any]]:
        if resumed_from is None:
            return []
        manifest = _read_json(Path(resumed_from) / "manifest.json", "the resumed checkpoint's manifest") or {}
        lineage = _attempts(manifest.get("provenance"))
        if not lineage and step > 0:  # a checkpoint written before provenance was recorded
            lineage = [{"attempt": None, "first_step": 1, "last_step": step, "ended": UNKNOWN,
                        "note": "checkpoint written without provenance"}]
        return lineage

    def update(self, step: int, ended: Optional[str] = None) -> None:
        self.current["last_step"] = step
        if ended:
            self.current["ended"], self.current["ended_at"] = ended, now_iso()

    def _current_lineage(self) -> List[Dict[str, Any]]:
        return [*self.lineage, dict(self.current)]

    def manifest_entry(self) -> Dict[str, Any]:
        """The ``provenance`` entry of a checkpoint saved now: the attempts whose updates it holds."""
        sha = self.current["config_sha256"]
        shas = {a.get("config_sha256") for a in self._current_lineage()} | {sha}
        return {"format": FORMAT, "attempts": self._current_lineage(),
                "configs": {k: v for k, v in self.configs.items() if k in shas}}

    def document(self) -> Dict[str, Any]:
        lineage = [{k: a.get(k) for k in ("attempt", "first_step", "last_step")} for a in self._current_lineage()]
        return {"format": FORMAT, "attempts": [*self.history, dict(self.current)], "lineage": lineage,
                "configs": self.configs}

    def write(self) -> None:
        """Atomic, 0600 (the redacted config may still hold site details). Never raises."""
        try:
            write_private(self.path, json.dumps(self.document(), indent=1, sort_keys=True))
        except OSError as e:
            log.warning("provenance: cannot write %s: %s", self.path, e)


def local_hostname() -> str:
    return socket.gethostname()
