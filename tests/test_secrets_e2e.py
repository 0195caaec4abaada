"""No credential reaches disk or a log: a short 1-rank training with W&B (offline) and
``dist-llm submit slurm --dry-run``, with ``WANDB_API_KEY=SENTINEL`` in the environment and the
same sentinel inside a ``launcher.setup`` line and ``launcher.srun_args``; then every file
under the working directory (run dir, checkpoints, W&B files, config.yaml) and every output
stream is searched for it.

Run under the shared lock (the local launcher starts a rank process).
"""
from __future__ import annotations

import stat
from pathlib import Path

import pytest
from helpers import TINY, run_cli

pytestmark = pytest.mark.slow

SENTINEL = "SENTINELVALUE123"
# Where the launcher's shell setup lines live; adapt here if the launcher config is regrouped
# (e.g. launcher.slurm.setup).
SETUP_FIELD = "launcher.slurm.setup"
SRUN_FIELD = "launcher.slurm.srun_args"
SECRET_OVERRIDES = [f"{SETUP_FIELD}=['export HF_TOKEN={SENTINEL}','module load cuda']",
                    f"{SRUN_FIELD}=['--container-env=WANDB_API_KEY={SENTINEL}']"]


def _files_with(root: Path, needle: bytes) -> list:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
            hits.append(str(p))
    return hits


def test_sentinel_never_reaches_disk_or_logs(workdir):
    env = {"WANDB_API_KEY": SENTINEL, "WANDB_MODE": "offline", "HF_TOKEN": SENTINEL}
    train = run_cli(["train", *TINY, "logging=wandb", "logging.console=true", "name=sec", "train.max_steps=4",
                     "train.checkpoint.every=2", "train.eval_every=0", *SECRET_OVERRIDES], cwd=workdir, env=env)
    submit = run_cli(["submit", "slurm", "--dry-run", "name=sec", "output_dir=runs", *SECRET_OVERRIDES],
                     cwd=workdir, env=env)
    run = workdir / "runs" / "sec"
    assert (run / "checkpoints" / "latest").is_file() and list(run.rglob("manifest.json"))
    assert list((run / "wandb").glob("offline-run-*")), "the W&B sink was not exercised"
    assert "srun" in submit.stdout and "export HF_TOKEN=" in submit.stdout  # the script was rendered
    for name, text in (("train stdout", train.stdout), ("train stderr", train.stderr),
                       ("submit stdout", submit.stdout), ("submit stderr", submit.stderr)):
        assert SENTINEL not in text, name
    assert _files_with(workdir, SENTINEL.encode()) == []
    assert stat.S_IMODE((run / "config.yaml").stat().st_mode) == 0o600
