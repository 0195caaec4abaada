"""Against a real Slurm cluster on this machine (slurmctld + 2 slurmd fake nodes on 127.0.0.1):
the rendered sbatch script, the signal -> checkpoint -> requeue -> resume loop, multi-node ranks.

Start/stop: tests/cluster/start_local_slurm.sh / stop_local_slurm.sh (the fixture does it).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_helpers import committed_steps, job_info, job_logs, losses, wait_ended, wait_until  # noqa: E402

from dist_llm.config.schema import JobConfig  # noqa: E402
from dist_llm.launch.env import EXIT_PREEMPTED  # noqa: E402
from dist_llm.submit.slurm import render_sbatch, submit_slurm  # noqa: E402

pytestmark = pytest.mark.slurm
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
QUIET = open(os.devnull, "w")


def make_stub(tmp_path: Path) -> str:
    """An executable that runs stub_rank.py with this interpreter (it receives the trainer's
    argv: ``-m dist_llm.cli.main train <overrides>``)."""
    stub = tmp_path / "stub_rank"
    stub.write_text(f"#!{sys.executable}\nimport runpy, sys\nsys.path.insert(0, {str(REPO)!r})\n"
                    f"runpy.run_path({str(HERE / 'stub_rank.py')!r}, run_name='__main__')\n")
    stub.chmod(0o755)
    return str(stub)


@pytest.mark.parametrize("nodes,tpn", [(2, 1)])
def test_signal_chain_requeues_and_restarts(slurm_cluster, tmp_path, nodes, tpn):
    """scancel --batch --signal=USR1 -> batch trap -> srun -> every rank; rank 0 runs
    `scontrol requeue`; the job restarts (SLURM_RESTART_COUNT=1) under the same id and ends
    COMPLETED. Rank 1 on node2 reaches rank 0 on node1 via MASTER_ADDR/MASTER_PORT."""
    stub = make_stub(tmp_path)
    cfg = JobConfig()
    cfg.name = "stub"
    cfg.output_dir = str(tmp_path / "runs")
    cfg.launcher.nodes, cfg.launcher.tasks_per_node = nodes, tpn
    cfg.launcher.slurm.time = "5"
    overrides = [f"output_dir={cfg.output_dir}", "name=stub"]
    job = submit_slurm(cfg, overrides, python=str(stub), stdout=QUIET)
    run_dir = Path(cfg.output_dir) / f"stub-{job}"
    wait_until(lambda: all((run_dir / f"ready.{r}").exists() for r in range(nodes * tpn)) or
               job_info(job).get("JobState") in ("FAILED", "COMPLETED", "CANCELLED"), 60, "ranks ready")
    time.sleep(0.5)
    t0 = time.time()
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    info = wait_ended(job, 120)
    logs = job_logs(run_dir)
    assert info["JobState"] == "COMPLETED", logs
    assert info.get("Restarts") == "1", info
    recs = {p.name: json.loads(p.read_text()) for p in run_dir.glob("rank*.json")}
    assert sorted(recs) == sorted(f"rank{r}.restart{k}.json" for r in range(nodes * tpn) for k in (0, 1)), logs
    for r in range(nodes * tpn):
        assert recs[f"rank{r}.restart0.json"]["signal"] == ["USR1"], logs
        assert recs[f"rank{r}.restart0.json"]["launcher"] == "slurm"
    assert recs["rank0.restart0.json"]["requeued"] is True
    assert recs["rank0.restart0.json"]["master"].startswith("node1:")
    if nodes == 2:
        assert recs["rank1.restart0.json"]["node"] == "node2"
        assert recs["rank0.restart0.json"]["peer"] == "rank1@node2"
    assert "forwarding to the training step" in logs
    assert f"job {job} restart 1:" in logs and "training step ended with code 0" in logs
    print(f"signal -> requeue -> COMPLETED in {time.time() - t0:.1f}s", file=sys.stderr)


# ---------------------------------------------------------------- the real trainer
MAX_STEPS = 50


def tiny_overrides(out_dir: Path, name: str, data_dir: Path) -> list:
    return ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", f"train.max_steps={MAX_STEPS}",
            "train.checkpoint.every=25", "train.ui.progress_bar=off", "optim.warmup_steps=5",
            "logging=none", f"data.embedded_dir={data_dir}", f"output_dir={out_dir}", f"name={name}"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from dist_llm.prepare import build_stdlib_corpus

    data_dir = tmp_path_factory.mktemp("corpus") / "stdlib"
    build_stdlib_corpus(data_dir, 32)  # once, before the jobs (they would race to build it)
    return data_dir


@pytest.fixture(scope="module")
def tiny_jobs(slurm_cluster, corpus, tmp_path_factory):
    """Tiny training jobs, submitted together:
    ref  - 1 node x 2 tasks, uninterrupted;   multi - 2 nodes x 1 task, uninterrupted;
    pre  - 1 node x 2 tasks, preempted with `scancel --batch --signal=USR1` mid-run;
    cancel - 1 task, cancelled with a plain `scancel` mid-run (must stay cancelled)."""
    from dist_llm.config.store import compose

    tmp = tmp_path_factory.mktemp("slurm-train")
    data_dir = corpus
    out = tmp / "runs"
    shapes = {"ref": (1, 2), "multi": (2, 1), "pre": (1, 2), "cancel": (1, 1)}
    jobs, run_dirs = {}, {}
    t0 = time.time()
    for name, (nodes, tpn) in shapes.items():
        ov = tiny_overrides(out, name, data_dir) + [f"launcher.nodes={nodes}", f"launcher.tasks_per_node={tpn}",
                                                     "launcher.slurm.time=10", "launcher.slurm.cpus_per_task=1"]
        if name == "cancel":
            ov.append("train.max_steps=100000")
        cfg = compose(ov + ["launcher=slurm"])
        jobs[name] = submit_slurm(cfg, ov, python=sys.executable, stdout=QUIET)
        run_dirs[name] = out / f"{name}-{jobs[name]}"
    try:
        # preempt: wait until the job trains (its handlers are installed), then signal the batch shell
        pre, pre_dir = jobs["pre"], run_dirs["pre"]
        wait_until(lambda: len(losses(pre_dir)) >= 2 or job_info(pre).get("JobState") in ("FAILED", "COMPLETED"),
                   180, "the preempt job to train", poll=0.05)
        seen = max(losses(pre_dir), default=0)
        subprocess.run(["scancel", "--batch", "--signal=USR1", pre], check=True)
        # a plain `scancel` (SIGTERM to the ranks, which also save) must not turn into a requeue
        cancel, cancel_dir = jobs["cancel"], run_dirs["cancel"]
        wait_until(lambda: len(losses(cancel_dir)) >= 2 or job_info(cancel).get("JobState") in ("FAILED",),
                   180, "the cancel job to train", poll=0.1)
        subprocess.run(["scancel", cancel], check=True)
        infos = {name: wait_ended(job, 300) for name, job in jobs.items()}
        time.sleep(3)  # a wrongly requeued job would be PENDING/RUNNING again by now
        infos["cancel"] = job_info(cancel)
    except BaseException:
        subprocess.run(["scancel", *jobs.values()], capture_output=True)
        raise
    print(f"[tiny_jobs] 4 jobs done in {time.time() - t0:.1f}s; signal sent at step {seen}", file=sys.stderr)
    return {"jobs": jobs, "dirs": run_dirs, "infos": infos, "signal_step": seen}


def _assert_completed(tiny_jobs, name):
    info, run_dir = tiny_jobs["infos"][name], tiny_jobs["dirs"][name]
    assert info["JobState"] == "COMPLETED", f"{info.get('JobState')} {info.get('ExitCode')}\n{job_logs(run_dir)}"
    assert committed_steps(run_dir)[-1] == MAX_STEPS, job_logs(run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{MAX_STEPS:08d}"
    assert sorted(losses(run_dir)) == list(range(1, MAX_STEPS + 1)), job_logs(run_dir)


def test_one_node_two_tasks_completes_with_checkpoint(tiny_jobs):
    _assert_completed(tiny_jobs, "ref")


def test_two_nodes_one_task_each_completes_and_matches(tiny_jobs):
    _assert_completed(tiny_jobs, "multi")
    logs = job_logs(tiny_jobs["dirs"]["multi"])
    assert "2 node(s), master node1:" in logs
    assert tiny_jobs["infos"]["multi"]["NodeList"] == "node[1-2]"
    ref, multi = losses(tiny_jobs["dirs"]["ref"]), losses(tiny_jobs["dirs"]["multi"])
    assert max(abs(ref[s] - multi[s]) for s in ref) <= 1e-6


def test_preempted_job_requeues_resumes_and_matches_uninterrupted(tiny_jobs):
    run_dir, info = tiny_jobs["dirs"]["pre"], tiny_jobs["infos"]["pre"]
    logs = job_logs(run_dir)
    _assert_completed(tiny_jobs, "pre")
    assert info.get("Restarts") == "1", info
    assert "forwarding to the training step" in logs
    assert f"job {tiny_jobs['jobs']['pre']} restart 1:" in logs
    m = re.search(r"\[rank 0\] .*saving a checkpoint at step (\d+)", logs)
    assert m, logs
    pre_step = int(m.group(1))
    assert re.search(rf"\[rank 0\] .*resumed from \S+step-{pre_step:08d} at step {pre_step}", logs), logs
    assert "requeued job" in logs
    # saved after the signal and before the end (metrics.jsonl lags the ranks, so no tighter bound)
    assert tiny_jobs["signal_step"] <= pre_step < MAX_STEPS
    ref, pre = losses(tiny_jobs["dirs"]["ref"]), losses(run_dir)
    diffs = {s: abs(ref[s] - pre[s]) for s in ref}
    assert max(diffs.values()) <= 1e-6, {s: d for s, d in diffs.items() if d > 1e-6}
    print(f"preempted at step {pre_step} (signal sent after step {tiny_jobs['signal_step']}); "
          f"max |loss diff| {max(diffs.values()):.2e}", file=sys.stderr)


def test_handwritten_example_script_trains(slurm_cluster, corpus, tmp_path):
    """slurm/train_gpt_1node.sbatch as a user would submit it (from the repository root, extra
    Hydra overrides after the script name) ends COMPLETED with a committed checkpoint."""
    out = tmp_path / "runs"
    ov = tiny_overrides(out, "example", corpus) + ["train.max_steps=6", "train.checkpoint.every=3"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    r = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out",
                        str(REPO / "slurm" / "train_gpt_1node.sbatch"), *ov],
                       cwd=REPO, env=env, capture_output=True, text=True, check=True)
    job = r.stdout.strip().split(";")[0]
    info = wait_ended(job, 300)
    log = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert info["JobState"] == "COMPLETED", log[-6000:]
    run_dir = out / f"example-{job}"
    assert committed_steps(run_dir)[-1] == 6, log[-6000:]
    assert sorted(losses(run_dir)) == list(range(1, 7))


def test_plain_scancel_is_not_turned_into_a_requeue(tiny_jobs):
    info, logs = tiny_jobs["infos"]["cancel"], job_logs(tiny_jobs["dirs"]["cancel"])
    assert info["JobState"] == "CANCELLED" and info.get("Restarts") == "0", (info, logs)
    assert "not RUNNING" in logs and "not requeueing" in logs, logs
