"""Against a real Ray cluster on this machine (ray_jobs/start_local_cluster.sh: 127.0.0.1, 2 CPUs,
token auth): a Ray job submitted through the job API trains with 2 Ray Train workers; one worker
process dies mid-run (debug.crash_at_step/crash_rank: os._exit), Ray restarts the worker group,
the run resumes from its last committed checkpoint and ends with the same losses as an
uninterrupted run of the same config (the local 2-rank launcher, run alongside)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_helpers import losses  # noqa: E402

pytestmark = pytest.mark.ray
MAX_STEPS = 12


def tiny(out: Path, data_dir: Path, name: str) -> list:
    return ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", f"train.max_steps={MAX_STEPS}",
            "train.checkpoint.every=4", "train.ui.progress_bar=off", "optim.warmup_steps=3", "logging=none",
            f"data.embedded_dir={data_dir}", f"output_dir={out}", f"name={name}"]


def test_ray_job_worker_crash_restarts_group_and_matches_uninterrupted(ray_cluster, tmp_path, monkeypatch):
    from dist_llm.config.store import compose
    from dist_llm.prepare import build_stdlib_corpus
    from dist_llm.submit.ray_job import submit_ray_job

    for k, v in ray_cluster["env"].items():  # the job API needs the cluster's token
        if k.startswith("RAY_AUTH"):
            monkeypatch.setenv(k, v)
    from ray.job_submission import JobStatus, JobSubmissionClient

    data_dir = tmp_path / "stdlib"
    build_stdlib_corpus(data_dir, 32)
    out = tmp_path / "runs"
    t0 = time.time()
    # the uninterrupted reference: same config, 2 ranks on the local launcher, run alongside
    ref = subprocess.Popen([sys.executable, "-m", "dist_llm.cli.main", "train", *tiny(out, data_dir, "ref"),
                            "launcher=local", "launcher.nproc=2"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    overrides = tiny(out, data_dir, "crash") + ["debug.crash_at_step=6", "debug.crash_rank=1",
                                                "launcher.ray.num_workers=2", "launcher.ray.cpus_per_worker=1",
                                                "launcher.ray.max_failures=2"]
    cfg = compose(overrides + ["launcher=ray"])
    sid = submit_ray_job(cfg, overrides, address=ray_cluster["dashboard"], stdout=open(os.devnull, "w"))
    client = JobSubmissionClient(ray_cluster["dashboard"])
    end = time.time() + 420
    status = None
    while time.time() < end:
        status = client.get_job_status(sid)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    logs = client.get_job_logs(sid)
    ref_out, _ = ref.communicate(timeout=300)
    print(f"[ray] job {sid} {status} after {time.time() - t0:.1f}s", file=sys.stderr)
    assert status == JobStatus.SUCCEEDED, logs[-8000:]
    assert ref.returncode == 0, ref_out[-4000:]

    (run_dir,) = [p for p in out.glob("crash-ray*") if p.is_dir() and not p.name.endswith(".ray")]
    assert list(run_dir.glob(".*-at-6")), "the crash hook never fired (no .fault-at-6 marker)"
    assert "resumed from" in logs and "step-00000004" in logs, logs[-8000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))[-1] == f"step-{MAX_STEPS:08d}"
    assert (run_dir / "checkpoints" / f"step-{MAX_STEPS:08d}" / "rank-00001.pt").exists()  # 2 ranks
    got, want = losses(run_dir), losses(out / "ref")
    assert sorted(got) == sorted(want) == list(range(1, MAX_STEPS + 1))
    diffs = {s: abs(got[s] - want[s]) for s in want}
    assert max(diffs.values()) <= 1e-6, diffs
    assert abs(got[MAX_STEPS] - want[MAX_STEPS]) <= 1e-6
