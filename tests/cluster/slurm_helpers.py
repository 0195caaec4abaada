"""Helpers for the tests against the real local Slurm cluster."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE")


def job_info(job_id: str) -> dict:
    r = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S+)", r.stdout))


def wait_until(pred, timeout: float, what: str, poll: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_ended(job_id: str, timeout: float = 300.0) -> dict:
    """Wait for the job to end (a requeued job runs again after ``cred_expire`` = 10 s plus a
    scheduling pass; `scontrol update StartTime=now` is *not* used to hurry it: started too early,
    slurmd refuses the job with "Job credential revoked" and it FAILS)."""
    end = time.time() + timeout
    info: dict = {}
    while time.time() < end:
        info = job_info(job_id)
        if info.get("JobState", "UNKNOWN") in ENDED:
            return info
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s: {info}")


def job_logs(run_dir: Path) -> str:
    out = []
    for p in sorted(run_dir.glob("slurm-*")):
        out.append(f"==== {p.name}\n{p.read_text(errors='replace')[-6000:]}")
    return "\n".join(out)


def losses(run_dir: Path) -> dict:
    """step -> train/loss from <run_dir>/metrics.jsonl (the last record of a step wins)."""
    import json

    out = {}
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "train/loss" in rec and "step" in rec:
            out[int(rec["step"])] = float(rec["train/loss"])
    return out


def committed_steps(run_dir: Path) -> list:
    ck = run_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in ck.glob("step-*") if (p / "manifest.json").exists())
