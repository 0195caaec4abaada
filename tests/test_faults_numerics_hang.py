"""Hangs and numerical faults end to end: the real CLI, 2 gloo ranks, DeepSpeed, a tiny model.

* Test 5 (hang): rank 1 sleeps 300 s in front of the step's all-reduce at step 5, with
  ``parallel.timeout_s=20`` (after the first step) and ``train.hang_timeout_s=30``. Every rank
  exits non-zero within 60 s of the fault, the log names the rank, the step and the collective
  (``all_reduce:loss+nonfinite``), and no process of the launcher's tree is left behind.
* Test 6 (NaN at step 25):
  - ``train.nonfinite=raise`` (NaN in rank 1's loss, ZeRO-0: the torch optimizer's path): the
    job fails naming step 25; the newest checkpoint is step 24 and none is written after it; its
    weights equal those of step 24 in the skip run below (same data and seed).
  - ``train.nonfinite=skip`` (+Inf in one gradient on rank 1 only, ZeRO-2: DeepSpeed's partitioned
    path; a NaN loss on rank 1, ZeRO-0): both ranks log the skip at step 25; the checkpoint of step
    25 holds exactly the weights and optimizer moments of step 24 (nothing was updated),
    ``skipped_steps`` counts it; steps 26, 27 train on; a resume to step 30 keeps the count.
  - The ZeRO-2 launch also spikes rank 1's loss x100 at step 20 (``train.spike.policy=skip``):
    both ranks log the spike, step 20's checkpoint equals step 19's, the count includes it.

Run under the shared lock (several processes): flock /tmp/dist-llm-heavy.lock pytest ...
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import TINY, metrics, run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# A fixed decay horizon: runs of different train.max_steps share the LR of every step.
COMMON = [*TINY, "launcher.nproc=2", "train.eval_every=0", "train.checkpoint.keep_last=10", "optim.decay_steps=40"]
CKPT = Path("runs") / "{name}" / "checkpoints" / "step-{step:08d}"


def _ckpt(job: Path, name: str, step: int) -> Path:
    return job / str(CKPT).format(name=name, step=step)


def _weights(job: Path, name: str, step: int):
    return load_file(str(_ckpt(job, name, step) / "model.safetensors"))


def _trainer_state(job: Path, name: str, step: int) -> dict:
    return json.loads((_ckpt(job, name, step) / "trainer.json").read_text())


def _tensors(obj, out=None):
    out = [] if out is None else out
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            _tensors(obj[k], out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)
    return out


def _moments(job: Path, name: str, step: int, rank: int):
    """This rank's optimizer slices (masters, moments) from the checkpoint's elastic/ form."""
    from safetensors.torch import load_file

    blob = load_file(str(_ckpt(job, name, step) / "elastic" / f"rank-{rank:05d}.safetensors"))
    return _tensors(blob)


@pytest.fixture(scope="module")
def job(tmp_path_factory, stdlib_cache):
    import shutil

    root = tmp_path_factory.mktemp("numerics")
    shutil.copytree(stdlib_cache, root / "data" / "stdlib")
    return root


# ZeRO-2 + an Inf gradient: DeepSpeed's partitioned overflow check withholds the update; the same
# launch spikes rank 1's loss x100 at step 20 (detector: 5 x the median of 5 steps, policy skip).
# ZeRO-0 + a NaN loss: our all-reduced flag does, through the torch optimizer's no-op step.
SPIKE = ["debug.spike_at_step=20", "debug.spike_factor=100", "train.spike.factor=5", "train.spike.window=5",
         "train.spike.policy=skip"]


@pytest.mark.parametrize("stage,target,bad", [("zero2", "grad", "inf"), ("zero0", "loss", "nan")])
def test_nan_with_skip_withholds_the_update_on_every_rank_and_the_count_survives_resume(job, stage, target, bad):
    name = f"skip-{stage}-{target}"
    spike = stage == "zero2"
    args = ["train", *COMMON, f"name={name}", f"parallel={stage}", "train.checkpoint.every=1",
            "debug.nan_at_step=25", f"debug.nan_in={target}", f"debug.inf={bad == 'inf'}", "debug.fault_rank=1",
            "train.nonfinite=skip", *(SPIKE if spike else [])]
    p = run_cli([*args, "train.max_steps=27"], cwd=job)
    log = p.stdout + p.stderr
    assert f"[rank 1] dist_llm.train: fault injection: rank 1 puts {bad} into the {target} at step 25" in log
    for rank in (0, 1):
        assert f"[rank {rank}] dist_llm.train: step 25: non-finite" in log, log[-3000:]
    withheld = [20, 25] if spike else [25]
    if spike:
        for rank in (0, 1):
            assert f"[rank {rank}] dist_llm.train: step 20: loss spike: " in log, log[-3000:]
    for step in withheld:
        w_before, w_at = _weights(job, name, step - 1), _weights(job, name, step)
        assert all(torch.equal(w_before[k], w_at[k]) for k in w_before), step  # the update was withheld
        for rank in (0, 1):
            m_before, m_at = _moments(job, name, step - 1, rank), _moments(job, name, step, rank)
            assert len(m_before) == len(m_at) > 0 and all(torch.equal(a, b) for a, b in zip(m_before, m_at)), step
    w25, w27 = _weights(job, name, 25), _weights(job, name, 27)
    assert not all(torch.equal(w25[k], w27[k]) for k in w25)  # training went on
    counts = [_trainer_state(job, name, s)["skipped_steps"] for s in (19, 20, 24, 25, 27)]
    assert counts == ([0, 1, 1, 2, 2] if spike else [0, 0, 0, 1, 1]), counts
    run_cli([*args, "train.max_steps=30"], cwd=job)  # resumes from step 27
    assert _trainer_state(job, name, 30)["skipped_steps"] == len(withheld)
    assert sorted(metrics(job / "runs" / name))[-1] == 30


def test_nan_with_raise_stops_at_the_step_before_and_saves_nothing_poisoned(job):
    p = run_cli(["train", *COMMON, "name=raise", "parallel=zero0", "train.checkpoint.every=8", "train.max_steps=30",
                 "debug.nan_at_step=25", "debug.nan_in=loss", "debug.fault_rank=1", "train.nonfinite=raise"],
                cwd=job, check=False)
    log = p.stdout + p.stderr
    assert p.returncode != 0
    assert "step 25: non-finite loss or gradient (loss nan)" in log, log[-3000:]
    assert "parameters are those of step 24" in log
    ckpts = sorted(x.name for x in (job / "runs" / "raise" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000008", "step-00000016", "step-00000024"], ckpts
    assert (job / "runs" / "raise" / "checkpoints" / "latest").read_text().strip().endswith("step-00000024")
    assert max(metrics(job / "runs" / "raise")) == 24  # step 25 never finished
    if (job / "runs" / "skip-zero0-loss").is_dir():  # same data, seed, engine, steps 1..24
        w_raise, w_skip = _weights(job, "raise", 24), _weights(job, "skip-zero0-loss", 24)
        assert all(torch.equal(w_raise[k], w_skip[k]) for k in w_raise)


def test_a_rank_hung_before_an_all_reduce_ends_every_rank_with_a_named_collective(job):
    args = ["train", *COMMON, "name=hang", "parallel=zero2", "train.max_steps=10", "train.checkpoint.every=0",
            "debug.sleep_at_step=5", "debug.sleep_s=300", "debug.fault_rank=1", "debug.collective=all_reduce:loss",
            "parallel.timeout_s=20", "parallel.first_step_timeout_s=120", "train.hang_timeout_s=30"]
    err_path = job / "hang.stderr"
    env = {**os.environ, "WANDB_SILENT": "true"}
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "dist_llm.cli.main", *args], cwd=job, env=env,
                                stdout=err, stderr=subprocess.STDOUT, text=True)
        launcher = psutil.Process(proc.pid)
        seen: set = set()
        fault_at = None
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                seen.update(c.pid for c in launcher.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
            if fault_at is None and "fault injection: rank 1 sleeps" in err_path.read_text():
                fault_at = time.monotonic()
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
        done = time.monotonic()
    log = err_path.read_text()
    assert proc.returncode not in (0, None), log[-3000:]
    assert fault_at is not None, log[-3000:]
    assert done - fault_at < 60, (done - fault_at, log[-3000:])
    # rank 0 waits in the all-reduce: its collective timeout (20 s, set after the first step; the
    # start-up timeout is 120 s and the watchdog's 30 s) ends it first, naming rank, step, collective
    assert "rank 0 failed at step 5 in phase all_reduce:loss+nonfinite" in log, log[-4000:]
    assert "fault injection: rank 1 sleeps 300 s at step 5 before all_reduce:loss+nonfinite" in log
    assert len(seen) >= 2  # the launcher's ranks were observed
    time.sleep(1.0)
    alive = [pid for pid in seen if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
