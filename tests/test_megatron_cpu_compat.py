"""The RNG streams the CPU compatibility layer gives Megatron's CUDA RNG tracker (tp=2, gloo).

Two of the layer's patches (``torch.cuda.manual_seed``, ``torch.cuda._lazy_call``) fail
silently when wrong: training runs, with wrong random streams (identical dropout masks on all
TP ranks, or the tracker's fork not switching streams). Only checks like these catch that.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from dist_llm.launch.env import free_port

from helpers import REPO

WORKER = textwrap.dedent("""
    import json, os, torch, torch.distributed as dist
    from dist_llm.config.schema import ParallelConfig
    from dist_llm.launch.env import read_launch_env
    from dist_llm.parallel.layout import init_layout
    layout = init_layout(ParallelConfig(engine="megatron", tp=2), read_launch_env())
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed, get_cuda_rng_tracker
    S, tp = 123, layout.tp_rank
    model_parallel_cuda_manual_seed(S)
    ref_default = torch.Generator().manual_seed(S)          # Megatron's data-parallel stream
    ref_mp = torch.Generator().manual_seed(S + 2718 + tp)   # its tensor-model-parallel stream
    ok = {}
    a = torch.rand(4)
    ok["default stream == Generator(seed)"] = torch.equal(a, torch.rand(4, generator=ref_default))
    with get_cuda_rng_tracker().fork():
        b = torch.rand(4)
    ok["fork() stream == Generator(seed + 2718 + tp_rank)"] = torch.equal(b, torch.rand(4, generator=ref_mp))
    c = torch.rand(4)
    ok["default stream resumes after fork"] = torch.equal(c, torch.rand(4, generator=ref_default))
    states = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    with get_cuda_rng_tracker().fork():
        d = torch.rand(4)
    ok["fork() stream continues (not replayed)"] = torch.equal(d, torch.rand(4, generator=ref_mp))
    get_cuda_rng_tracker().set_states(states)  # what a checkpoint restores
    with get_cuda_rng_tracker().fork():
        e = torch.rand(4)
    ok["restored tracker state replays the stream"] = torch.equal(d, e)
    with get_cuda_rng_tracker().fork():  # Megatron's TP-region dropout draws from the fork
        mask = torch.nn.functional.dropout(torch.ones(64), 0.5)
    other = [torch.empty(4) for _ in range(2)]
    dist.all_gather(other, b)
    ok["fork() values differ across TP ranks"] = not torch.equal(other[0], other[1])
    dist.all_gather(other, a)
    ok["default values equal across TP ranks"] = torch.equal(other[0], other[1])
    masks = [torch.empty(64) for _ in range(2)]
    dist.all_gather(masks, mask)
    ok["TP-region dropout masks differ across TP ranks"] = not torch.equal(masks[0], masks[1])
    if layout.rank == 0:
        print("RESULT" + json.dumps(ok))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_rng_tracker_streams_on_cpu(tmp_path):
    script = tmp_path / "rng_worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    ok = json.loads(outs[0][0].split("RESULT", 1)[1])
    failed = [k for k, v in ok.items() if not v]
    assert not failed, failed
    assert len(ok) == 8
