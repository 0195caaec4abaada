"""Checkpoint faults end to end: the real CLI, 2 gloo ranks, DeepSpeed ZeRO-2, real checkpoints.

One uninterrupted run saves steps 10, 20 and 30; each test copies its run directory, damages
the newest checkpoint and starts the same job again (``train.checkpoint.resume=auto``):

* a flipped byte (in rank 1's file, which only rank 1 reads: the ranks must agree), a missing
  file, a manifest entry that escapes, a symlink to a file outside: the job fails, the error
  names the file, nothing trains (never a silent fresh start);
* the same with ``train.checkpoint.resume_fallback=true``: the job resumes from step 20 and steps 21..30
  repeat the uninterrupted run's losses (to 1e-6: a resumed run repeats the same operations);
* a crafted pickle as a rank file or as ``sharded/.metadata``, manifest rewritten to match: the
  job fails and the sentinel file the pickle would create does not exist.

Run under the shared lock (several processes): flock /tmp/dist-llm-heavy.lock pytest ...
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY, metrics, run_cli

pytestmark = pytest.mark.slow

COMMON = ["launcher.nproc=2", "parallel=zero2", "train.max_steps=30", "train.checkpoint.every=10", "train.checkpoint.keep_last=3",
          "train.eval_every=0"]
STEP30 = Path("runs") / "base" / "checkpoints" / "step-00000030"


class Evil:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def base(tmp_path_factory, stdlib_cache):
    root = tmp_path_factory.mktemp("faults")
    shutil.copytree(stdlib_cache, root / "data" / "stdlib")
    run_cli(["train", *TINY, "name=base", *COMMON], cwd=root)
    names = sorted(p.name for p in (root / "runs" / "base" / "checkpoints").iterdir())
    assert names == ["latest", "step-00000010", "step-00000020", "step-00000030"], names
    return root


@pytest.fixture
def job(base, tmp_path):
    """A copy of the base working directory (data + run) to damage."""
    shutil.copytree(base / "data", tmp_path / "data")
    shutil.copytree(base / "runs", tmp_path / "runs", symlinks=True)
    return tmp_path


def _rerun(job: Path, *extra: str):
    return run_cli(["train", *TINY, "name=base", *COMMON, *extra], cwd=job, check=False)


def _update_manifest(ckpt: Path, rel: str) -> None:
    from dist_llm.fileio import sha256_file

    m = json.loads((ckpt / "manifest.json").read_text())
    m["files"][rel] = sha256_file(ckpt / rel)
    (ckpt / "manifest.json").write_text(json.dumps(m))


def _flip_rank1(c: Path, job: Path) -> str:
    p = c / "rank-00001.pt"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    return str(STEP30 / "rank-00001.pt")  # errors name it as the job sees it (relative to its cwd)


def _missing(c: Path, job: Path) -> str:
    (c / "trainer.json").unlink()
    return str(STEP30 / "trainer.json")


def _escaping(c: Path, job: Path) -> str:
    m = json.loads((c / "manifest.json").read_text())
    m["files"]["../../../../etc/passwd"] = "0" * 64
    (c / "manifest.json").write_text(json.dumps(m))
    return "../../../../etc/passwd"


def _symlink_out(c: Path, job: Path) -> str:
    outside = job / "outside.pt"
    os.replace(c / "rank-00000.pt", outside)  # same bytes: only the symlink check can catch it
    os.symlink(outside, c / "rank-00000.pt")
    return "symlink"


DAMAGE = {"flipped_byte_rank1": _flip_rank1, "missing_file": _missing, "escaping_path": _escaping,
          "symlink_outside": _symlink_out}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_checkpoint_is_a_named_error_never_a_fresh_start(job, kind):
    c = job / STEP30
    what = DAMAGE[kind](c, job)
    before = (job / "runs" / "base" / "metrics.jsonl").read_text()
    proc = _rerun(job)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "CheckpointError" in proc.stderr and what in proc.stderr, proc.stderr[-3000:]
    assert "resumed from" not in proc.stderr
    assert (job / "runs" / "base" / "metrics.jsonl").read_text() == before  # not one step trained


def test_fallback_resumes_the_previous_checkpoint_with_equal_losses(job, base):
    _flip_rank1(job / STEP30, job)  # only rank 1 sees it: both ranks must fall back together
    proc = _rerun(job, "train.checkpoint.resume_fallback=true")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr and "step-00000020" in proc.stderr, proc.stderr[-3000:]
    full, res = metrics(base / "runs" / "base"), metrics(job / "runs" / "base")
    assert max(abs(full[s] - res[s]) for s in range(21, 31)) <= 1e-6
    # step 30 was saved again over the damaged copy (the re-save path) and now verifies
    c = job / STEP30
    assert (job / "runs" / "base" / "checkpoints" / "latest").read_text().strip() == "step-00000030"
    assert not list(c.parent.glob("*.old"))
    from dist_llm.fileio import sha256_file
    m = json.loads((c / "manifest.json").read_text())
    assert all(sha256_file(c / rel) == h for rel, h in m["files"].items())


@pytest.mark.parametrize("where", ["rank-00000.pt", "sharded/.metadata"])
def test_crafted_pickle_in_a_checkpoint_does_not_run(job, where):
    c = job / STEP30
    sentinel = job / "SENTINEL"
    (c / where).parent.mkdir(exist_ok=True)
    if where.endswith(".pt"):
        torch.save({"optimizer": Evil(sentinel), "rng": {}, "loader": {}}, c / where)
    else:
        (c / where).write_bytes(pickle.dumps(Evil(sentinel), protocol=4))
    _update_manifest(c, where)  # the attacker rewrote the manifest too
    proc = _rerun(job)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert not sentinel.exists()
    assert "weights_only" in proc.stderr or "Weights only" in proc.stderr or "sharded" in proc.stderr, \
        proc.stderr[-3000:]
