"""Real DeepSpeed optimizers in one process (a world-1 gloo group): the state a ZeRO-2 optimizer
writes in the elastic form moves bit-exactly into ZeRO-0, ZeRO-1 and ZeRO-3 optimizers, and into
ZeRO-2 and ZeRO-3 with the optimizer offloaded to CPU (masters, both moments, step), read back through each one's own elastic form. The dp changes are covered
by tests/test_elastic_resume.py (gloo ranks); this checks the partition code of every stage
exactly, which the loss comparison there can only bound."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from dist_llm.parallel.elastic_state import STATES, read_plain_state


@pytest.fixture(scope="module")
def world1():
    # Restored afterwards: a leaked RANK/WORLD_SIZE would change how later in-process tests plan
    # their world size.
    saved = {k: os.environ.get(k) for k in ("DS_ACCELERATOR", "LOCAL_RANK", "RANK", "WORLD_SIZE")}
    for k, v in (("DS_ACCELERATOR", "cpu"), ("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    import torch.distributed as dist

    from dist_llm.parallel.deepspeed_engine import _skip_shm_comm_op

    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    _skip_shm_comm_op()
    yield
    if created:
        dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _engine(stage: int, steps: int, offload: bool = False):
    import deepspeed

    from dist_llm.config.schema import JobConfig, ModelConfig
    from dist_llm.models import build_model
    from dist_llm.parallel.deepspeed_common import deepspeed_config, param_groups

    cfg = JobConfig()
    cfg.parallel.zero_stage = stage
    cfg.parallel.offload_optimizer = offload  # DeepSpeed's CPU Adam (its step is an int)
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 2, 2
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=64, max_seq_len=16))
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1),
                                             config=deepspeed_config(cfg, 1), dist_init_required=False)
    for i in range(steps):
        x = (torch.arange(34).reshape(2, 17) * (i + 3)) % 64
        engine.backward(engine(x[:, :-1], x[:, 1:]))
        engine.step()
    return engine, opt


def _save(tmp, name, engine, opt, stage):
    from dist_llm.parallel.deepspeed_elastic import save_rank_state

    save_rank_state(tmp / name / "elastic", opt, engine.module, 0, 1, stage)
    files = {f"elastic/{p.name}": "-" for p in (tmp / name / "elastic").iterdir()}
    return read_plain_state(tmp / name, {"engine": "DeepSpeedEngine", "files": files})


@pytest.mark.parametrize("dst_stage,offload", [(0, False), (1, False), (3, False), (2, True), (3, True)])
def test_zero2_state_moves_exactly_into_another_stage(world1, tmp_path, dst_stage, offload):
    from dist_llm.parallel.deepspeed_elastic import load_rank_state

    src_engine, src_opt = _engine(2, steps=3)
    src = _save(tmp_path, "src", src_engine, src_opt, 2)
    assert src.step == 3
    dst_engine, dst_opt = _engine(dst_stage, steps=0, offload=offload)
    # ZeRO-1/2 say cpu_offload, ZeRO-3 offload_optimizer; on a CPU device the offloaded states
    # are stepped by torch's AdamW (no CPU-Adam JIT build), on a GPU by DeepSpeed's CPU Adam.
    offloaded = bool(getattr(dst_opt, "cpu_offload", False) or getattr(dst_opt, "offload_optimizer", False))
    assert offloaded == offload
    load_rank_state(dst_opt, dst_engine.module, src)
    dst = _save(tmp_path, "dst", dst_engine, dst_opt, dst_stage)
    assert dst.step == 3 and dst.names == src.names and len(src.names) > 4
    for n in src.names:
        a, b = src.get(n), dst.get(n)
        for k in STATES:
            assert a[k].abs().sum() > 0, (n, k)
            assert torch.equal(a[k], b[k]), (n, k)
    index = json.loads((tmp_path / "dst" / "elastic" / "rank-00000.json").read_text())
    assert index["zero_stage"] == dst_stage and all(len(s) >= 1 for s in index["shapes"].values())
