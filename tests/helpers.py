"""Shared helpers for the end-to-end tests: run the real CLI in a subprocess, read its metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]

# A tiny, fast job: 300 kB of stdlib text, 2-layer model, no W&B.
TINY = ["experiment=smoke", "data.embedded_max_bytes=300000", "logging=none", "train.ui.progress_bar=off"]


def run_cli(args: List[str], cwd: Path, timeout: int = 600, env: Dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.setdefault("WANDB_SILENT", "true")
    e.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "dist_llm.cli.main", *args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dist-llm {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir: Path, key: str = "train/loss") -> Dict[int, float]:
    """step -> value; a resumed run re-logs nothing before its checkpoint, the last record wins."""
    out: Dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[int(rec["step"])] = float(rec[key])
    return out


def max_rel_diff(a: Dict[int, float], b: Dict[int, float], steps) -> float:
    return max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in steps)


class TrainRunCache:
    """Each named `dist-llm train` run of a test module, started once and shared by its tests:
    ``get(name, extra, base)`` runs ``common + overrides[base or name] + extra`` in ``root`` the
    first time and returns its run directory."""

    def __init__(self, root: Path, common: list, overrides: dict):
        self.root, self.common, self.overrides = root, common, overrides
        self.done: dict = {}

    def get(self, name: str, extra=(), base: str = "") -> Path:
        if name not in self.done:
            run_cli(["train", *self.common, f"name={name}", *self.overrides.get(base or name, []), *extra],
                    cwd=self.root, env={"PYTHONPATH": str(REPO)}, timeout=900)
            self.done[name] = self.root / "runs" / name
        return self.done[name]

    def ckpt(self, name: str, step: int) -> Path:
        return self.get(name) / "checkpoints" / f"step-{step:08d}"
