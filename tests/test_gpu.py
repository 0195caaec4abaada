"""GPU variants (one device, one rank), skipped without CUDA. bench/gpu_check.sh runs them:
    pytest -q -m gpu tests/test_gpu.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_llm.config.schema import ModelConfig
from dist_llm.models import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_bf16_cuda_loss_matches_fp32_cpu(preset):
    """Same weights, same batch: the bf16 loss on the GPU is within bf16's precision (~1e-2
    relative over a 4-layer model) of the fp32 loss on the CPU."""
    torch.manual_seed(0)
    cfg = ModelConfig(preset=preset, n_layers=4, n_heads=4, d_model=128, vocab_size=320, max_seq_len=64)
    cpu = build_model(cfg)
    gpu = build_model(cfg)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to("cuda", torch.bfloat16)
    x = torch.randint(0, 320, (4, 65))
    ref = float(cpu(x[:, :-1], x[:, 1:]))
    got = gpu(x[:, :-1].cuda(), x[:, 1:].cuda())
    got.backward()
    assert abs(float(got) - ref) / ref < 2e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())


@pytest.mark.parametrize("parallel", ["zero1", "megatron"])
def test_one_rank_cuda_run_logs_the_breakdown_and_a_cuda_trace(tmp_path, parallel):
    """The real CLI on one GPU in bf16: finite loss, time/* phases with train.ui.breakdown (device
    synced at the phase boundaries), and a profiler trace that holds CUDA kernels."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "WANDB_MODE": "disabled"}
    env.pop("DS_ACCELERATOR", None)
    cmd = [sys.executable, "-m", "dist_llm.cli.main", "train", "model=demo", f"parallel={parallel}",
           "parallel.precision=bf16", "parallel.device=cuda", "launcher.nproc=1", "train.max_steps=8",
           "train.eval_every=0", "train.checkpoint.save_at_end=false", "train.sample.tokens=0", "logging=none",
           "train.ui.progress_bar=off", "train.ui.breakdown=true", "train.profile=3:2", "train.log_every=1",
           "data.embedded_max_bytes=300000", f"data.embedded_dir={tmp_path / 'data'}",
           f"output_dir={tmp_path / 'runs'}", "name=gpu"]
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, timeout=600)
    recs = [json.loads(x) for x in (tmp_path / "runs" / "gpu" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "train/loss" in r]
    assert len(steps) == 8 and all(r["train/loss"] == r["train/loss"] for r in steps)
    for k in ("time/data_s", "time/fwd_bwd_s", "time/optim_s", "time/comm_s"):
        assert k in steps[-1]
    assert steps[-1]["time/fwd_bwd_s"] > 0 and "mem/max_allocated_gb" in steps[-1]
    trace = json.loads((tmp_path / "runs" / "gpu" / "profile" / "rank0.json").read_text())
    cats = {e.get("cat", "") for e in trace["traceEvents"]}
    assert "kernel" in cats, sorted(cats)
