"""Issue 13 item 5, provenance: the record of one attempt (git present / absent / dirty, versions,
data fingerprints, launch environment) and the attempts accumulated across preemptions, crashes
and resumes, in ``provenance.json`` and in every checkpoint manifest.

In-process and fast: a real git binary on real repositories, real shards, and the real Trainer /
CheckpointManager of tests/test_trainer_unit.py (a world-1 layout, a tiny model). The 2-rank
preempt-and-requeue run through the CLI is asserted in tests/test_e2e_spine.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from test_trainer_unit import Callback, Crash, CrashAfter, make_trainer, shards  # noqa: F401 (fixture)

from dist_llm.checkpoint import provenance as pv
from dist_llm.checkpoint.provenance import PROVENANCE_FILE, Ledger, code_revision, launch_record
from dist_llm.config.schema import DatasetSource
from dist_llm.launch.env import read_launch_env
from dist_llm.train.callbacks import ProvenanceCallback
from dist_llm.train.trainer import Preempted

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env={**os.environ, **GIT_ENV}, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repository holding a package ``pkg`` (committed) and ignoring ``venv/``."""
    for k, v in GIT_ENV.items():
        monkeypatch.setenv(k, v)
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("x = 1\n")
    (root / ".gitignore").write_text("venv/\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "one")
    return root


# --- code revision ------------------------------------------------------------------------------
def test_revision_of_a_clean_tree_then_dirty_when_a_tracked_file_changes(repo):
    got = code_revision(repo / "pkg")
    assert got == {"revision": _git(repo, "rev-parse", "HEAD"), "dirty": False}
    (repo / "untracked.txt").write_text("runs, data, ...")  # untracked files do not make it dirty
    assert code_revision(repo / "pkg")["dirty"] is False
    (repo / "pkg" / "__init__.py").write_text("x = 2\n")
    assert code_revision(repo / "pkg") == {"revision": got["revision"], "dirty": True}
    _git(repo, "commit", "-q", "-am", "two")
    after = code_revision(repo / "pkg")
    assert after["dirty"] is False and after["revision"] != got["revision"]


def test_no_git_or_no_repository_is_unknown_never_an_error(repo, tmp_path, monkeypatch):
    assert code_revision(repo / "pkg", git=str(tmp_path / "no-such-git"))["revision"] == "unknown"
    (tmp_path / "plain" / "pkg").mkdir(parents=True)
    plain = code_revision(tmp_path / "plain" / "pkg")
    assert plain["revision"] == "unknown" and plain["dirty"] is None and "not in a git work tree" in plain["reason"]
    # A package installed in an ignored virtualenv inside a checkout is not that checkout's code.
    (repo / "venv" / "site" / "pkg").mkdir(parents=True)
    assert code_revision(repo / "venv" / "site" / "pkg")["revision"] == "unknown"
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # git not installed at all
    assert code_revision(repo / "pkg") == {"revision": "unknown", "dirty": None,
                                           "reason": f"{repo / 'pkg'} is not in a git work tree (or git is not available)"}


def test_this_package_revision_is_recorded():
    got = code_revision()  # the dist_llm under test: a checkout (a worktree in CI) or unknown
    assert set(got) >= {"revision", "dirty"}
    if got["revision"] != "unknown":
        assert len(got["revision"]) == 40 and isinstance(got["dirty"], bool)


# --- versions, data, launch environment ---------------------------------------------------------
def test_package_versions_come_from_metadata():
    import deepspeed
    import webdataset  # noqa: F401

    got = pv.package_versions()
    assert got["torch"] == torch.__version__ and got["deepspeed"] == deepspeed.__version__
    assert {"python", "megatron-core", "transformers", "webdataset", "dist-llm"} <= set(got)


def test_data_fingerprints_hash_the_manifests(shards, tmp_path):
    got = pv.data_fingerprints([DatasetSource(shards["train"], 0.7), DatasetSource("http://h/x/{0..3}.tar", 0.3),
                                DatasetSource(str(tmp_path / "gone"), 1.0)], shards["val"])
    want = hashlib.sha256((Path(shards["train"]) / "manifest.json").read_bytes()).hexdigest()
    assert got["train"][0] == {"path": shards["train"], "manifest_sha256": want, "weight": 0.7}
    assert got["train"][1]["manifest_sha256"] is None and "remote" in got["train"][1]["reason"]
    assert got["train"][2]["manifest_sha256"] is None and "manifest.json" in got["train"][2]["reason"]
    assert len(got["val"]["manifest_sha256"]) == 64
    assert pv.data_fingerprints([], None) == {"train": [], "val": None}


def test_launch_record_of_a_requeued_slurm_array_task():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4",
           "SLURM_JOB_ID": "1001", "SLURM_ARRAY_JOB_ID": "1000", "SLURM_ARRAY_TASK_ID": "3",
           "SLURM_RESTART_COUNT": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "WANDB_API_KEY": "k" * 40}
    got = launch_record(read_launch_env(env), ["gpu07"] * 4 + ["gpu08"] * 4, env)
    assert got["launcher"] == "slurm" and got["world_size"] == 8 and got["nodes"] == 2 and got["hosts"] == 2
    assert got["job_id"] == "1000_3" and got["slurm_restart_count"] == 2 and got["torchelastic_restart_count"] is None
    assert got["env"]["SLURM_ARRAY_TASK_ID"] == "3" and "WANDB_API_KEY" not in got["env"]  # ids only


def test_launch_record_of_a_restarted_torchrun_and_a_single_process():
    env = {"RANK": "0", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "GROUP_WORLD_SIZE": "2",
           "TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_RUN_ID": "abc"}
    got = launch_record(read_launch_env(env), ["a"] * 8 + ["b"] * 8, env)
    assert (got["launcher"], got["nodes"], got["hosts"], got["torchelastic_restart_count"]) == ("torchrun", 2, 2, 1)
    single = launch_record(read_launch_env({}), ["h"], {})
    assert (single["launcher"], single["world_size"], single["nodes"], single["job_id"]) == ("single", 1, 1, None)
    assert single["slurm_restart_count"] is None and single["env"] == {}


def test_config_is_redacted_and_fingerprinted_stably():
    cfg = {"logging": {"api_key": "secret-value-123"}, "train": {"max_steps": 3}}
    sha, clean = pv.config_fingerprint(cfg)
    assert clean["logging"]["api_key"] == "***REDACTED***" and cfg["logging"]["api_key"] == "secret-value-123"
    assert sha == pv.config_fingerprint(json.loads(json.dumps(cfg)))[0]
    assert sha != pv.config_fingerprint({**cfg, "train": {"max_steps": 4}})[0]


def test_an_attempt_that_never_reported_its_end_is_unknown(tmp_path):
    rec = {"code": {"revision": "unknown", "dirty": None}, "config_sha256": "c"}
    first = Ledger.start(tmp_path, rec, {}, 0)
    first.update(7)
    first.write()  # then kill -9: no end recorded
    second = Ledger.start(tmp_path, rec, {}, 0)
    second.write()
    doc = json.loads((tmp_path / PROVENANCE_FILE).read_text())
    assert [(a["attempt"], a["ended"], a["last_step"]) for a in doc["attempts"]] == [(0, "unknown", 7), (1, None, 0)]
    assert oct((tmp_path / PROVENANCE_FILE).stat().st_mode & 0o777) == "0o600"


# --- attempts through the real trainer ----------------------------------------------------------
def _trainer(run: Path, shards, *extra, **train):
    return make_trainer(run, shards, extra=[ProvenanceCallback(read_launch_env({})), *extra], **train)


def _manifest(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step:08d}" / "manifest.json").read_text())


def _steps(attempts) -> list:
    return [(a["attempt"], a["first_step"], a["last_step"], a["ended"]) for a in attempts]


class SignalAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, stats, step_time_s):
        if trainer.state.step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_preempted_and_requeued_run_lists_both_attempts_and_their_steps(tmp_path, shards):
    run = tmp_path / "run"
    with pytest.raises(Preempted):
        _trainer(run, shards, SignalAt(3), max_steps=6, checkpoint__every=0).fit()
    at3 = _manifest(run, 3)["provenance"]
    assert _steps(at3["attempts"]) == [(0, 1, 3, "preempted")]  # the preemption checkpoint says so itself
    first = at3["attempts"][0]
    assert first["resumed_from"] is None and first["launch"]["world_size"] == 1 and first["launch"]["hosts"] == 1
    assert first["data"]["train"][0]["manifest_sha256"] and first["versions"]["torch"] == torch.__version__
    assert first["config_sha256"] in at3["configs"] and "code" in first

    second = _trainer(run, shards, max_steps=6, checkpoint__every=0)
    second.fit()
    final = _manifest(run, 6)["provenance"]["attempts"]
    assert _steps(final) == [(0, 1, 3, "preempted"), (1, 4, 6, "completed")]
    assert final[1]["resumed_from"] == {"checkpoint": str(run / "checkpoints" / "step-00000003"), "step": 3}
    doc = json.loads((run / PROVENANCE_FILE).read_text())
    assert _steps(doc["attempts"]) == _steps(final)
    assert doc["lineage"] == [{"attempt": 0, "first_step": 1, "last_step": 3},
                              {"attempt": 1, "first_step": 4, "last_step": 6}]
    assert doc["attempts"][1]["ended_at"] >= doc["attempts"][1]["started_at"]


def test_a_resume_takes_the_lineage_of_its_checkpoint_and_discarded_work_leaves_a_gap(tmp_path, shards):
    run = tmp_path / "run"
    with pytest.raises(Crash):  # attempt 0 trains 1..5, saves 2 and 4, crashes at 5
        _trainer(run, shards, CrashAfter(5), max_steps=8, checkpoint__every=2).fit()
    with pytest.raises(Crash):  # attempt 1 resumes 4, crashes at 5 before any save
        _trainer(run, shards, CrashAfter(5), max_steps=8, checkpoint__every=2).fit()
    _trainer(run, shards, max_steps=8, checkpoint__every=2, checkpoint__keep_last=10).fit()  # resumes 4 again
    assert _steps(_manifest(run, 4)["provenance"]["attempts"]) == [(0, 1, 4, None)]  # still running at 4
    final = _manifest(run, 8)["provenance"]["attempts"]
    # Steps 1-4 of these weights are attempt 0's, 5-8 attempt 2's; attempt 1's step 5 was thrown away.
    assert _steps(final) == [(0, 1, 4, "crashed"), (2, 5, 8, "completed")]
    doc = json.loads((run / PROVENANCE_FILE).read_text())
    assert _steps(doc["attempts"]) == [(0, 1, 5, "crashed"), (1, 5, 5, "crashed"), (2, 5, 8, "completed")]
    assert doc["attempts"][1]["error"].startswith("Crash") and "error" not in doc["attempts"][2]
    assert [a["attempt"] for a in doc["lineage"]] == [0, 2]


def test_a_checkpoint_alone_carries_the_lineage_into_another_run_dir(tmp_path, shards):
    src = tmp_path / "src"
    with pytest.raises(Preempted):
        _trainer(src, shards, SignalAt(2), max_steps=4, checkpoint__every=0).fit()
    dst = tmp_path / "dst"  # provenance.json of src is not read: the manifest is the truth at step 2
    _trainer(dst, shards, max_steps=4, checkpoint__every=0, checkpoint__resume=str(src)).fit()
    assert _steps(_manifest(dst, 4)["provenance"]["attempts"]) == [(0, 1, 2, "preempted"), (1, 3, 4, "completed")]


def test_extra_manifest_entries_cannot_replace_the_managers_own(tmp_path):
    from test_trainer_unit import FakeEngine, world1_layout

    from dist_llm.checkpoint.manager import CheckpointManager

    manager = CheckpointManager(tmp_path, world1_layout(), keep_last=2)
    with pytest.raises(ValueError, match=r"\['files'\]"):
        manager.save(1, FakeEngine(), {}, {}, {}, extra_manifest={"files": {}})
    assert manager.latest() is None  # nothing committed
    path = manager.save(2, FakeEngine(), {}, {}, {}, extra_manifest={"provenance": {"attempts": []}})
    assert json.loads((path / "manifest.json").read_text())["provenance"] == {"attempts": []}
