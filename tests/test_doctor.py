"""``dist-llm doctor`` on the local mock cluster (2 real gloo ranks): a good config passes every
check; a missing shard directory and an unwritable output directory fail, naming the problem,
with a non-zero exit. Run under the shared lock (starts ranks)."""
from __future__ import annotations

import shutil

import pytest

from helpers import REPO, TINY, run_cli

pytestmark = pytest.mark.slow

ARGS = [*TINY, "launcher.nproc=2", "name=doc"]


def _doctor(cwd, *extra):
    return run_cli(["doctor", *ARGS, *extra], cwd=cwd, check=False, timeout=300, env={"PYTHONPATH": str(REPO)})


def _row(out: str, check: str) -> str:
    return next(line for line in out.splitlines() if line[6:].startswith(check))


def test_doctor_passes_a_good_config_and_names_each_problem(tmp_path, stdlib_cache):
    shutil.copytree(stdlib_cache, tmp_path / "data" / "stdlib")
    good = _doctor(tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr[-3000:]
    for check in ("config", "memory per rank", "ranks reach each other", "shards", "output dir"):
        assert _row(good.stdout, check).startswith("PASS"), good.stdout
    assert "all 2 ranks: 2 ranks, barrier + all_reduce over gloo" in good.stdout
    assert "train: " in _row(good.stdout, "shards") and "first verified" in _row(good.stdout, "shards")

    missing = _doctor(tmp_path, "data.train=[{path: data/nowhere/train}]")
    assert missing.returncode != 0
    row = _row(missing.stdout, "shards")
    assert row.startswith("FAIL") and "rank 0" in row and "rank 1" in row and "data/nowhere/train" in row

    (tmp_path / "not-a-dir").write_text("x")
    unwritable = _doctor(tmp_path, f"output_dir={tmp_path / 'not-a-dir' / 'runs'}")
    assert unwritable.returncode != 0
    row = _row(unwritable.stdout, "output dir")
    assert row.startswith("FAIL") and "not-a-dir/runs: cannot write" in row and "output_dir" in row
    assert _row(unwritable.stdout, "shards").startswith("PASS")
