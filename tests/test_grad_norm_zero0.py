"""Issue 9, Fix 10: ``parallel=zero0`` logs the real gradient norm (DeepSpeed records none there).

A 1-rank ZeRO-0 run through the real CLI logs a finite ``train/grad_norm`` on every step, and the
first step's equals the norm a plain PyTorch loop computes on the same first batch from the same
initial weights (sum of micro-batch losses / accumulation steps, as DeepSpeed scales them). fp32
on CPU, the same kernels in the same order up to the reduction: 1e-5 relative.
Run under the shared lock (the CLI starts a rank process).
"""
from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch

from helpers import REPO, TINY, metrics, run_cli

pytestmark = pytest.mark.slow


def _reference_first_norm(run_dir: Path) -> float:
    from dist_llm.config.schema import DatasetSource
    from dist_llm.config.store import job_config_from_yaml
    from dist_llm.data import TrainLoader
    from dist_llm.models import build_model
    from dist_llm.train.run import _seed_all

    cfg = job_config_from_yaml(str(run_dir / "config.yaml"))
    data = dataclasses.replace(cfg.data, train=[DatasetSource(path=str(Path(cfg.data.embedded_dir) / "train"),
                                                              weight=1.0)])
    tr = cfg.train
    loader = TrainLoader.from_config(data, tr, 0, 1, tr.global_batch_size // tr.micro_batch_size)
    try:
        micro = loader.next_step()
    finally:
        loader.close()
    _seed_all(cfg.train.seed)
    model = build_model(cfg.model)
    for mb in micro:
        (model(mb[:, :-1], mb[:, 1:]) / len(micro)).backward()
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))


def test_zero0_logs_the_real_grad_norm(tmp_path, stdlib_cache, monkeypatch):
    shutil.copytree(stdlib_cache, tmp_path / "data" / "stdlib")
    run_cli(["train", *TINY, "name=z0", "parallel=zero0", "launcher.nproc=1", "train.max_steps=4",
             "train.eval_every=0", "train.checkpoint.every=0", "train.checkpoint.save_at_end=false"], cwd=tmp_path,
            env={"PYTHONPATH": str(REPO)})
    norms = metrics(tmp_path / "runs" / "z0", "train/grad_norm")
    assert sorted(norms) == [1, 2, 3, 4] and all(math.isfinite(v) and v > 0 for v in norms.values()), norms
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    ref = _reference_first_norm(tmp_path / "runs" / "z0")
    assert abs(norms[1] - ref) <= 1e-5 * ref, (norms[1], ref)
