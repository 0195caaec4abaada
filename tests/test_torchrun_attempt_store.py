"""torchrun restarts: each attempt's process group lives in a fresh namespace of the agent's store.

torchrun's elastic agent keeps one TCPStore for all attempts; without a per-attempt namespace a
restarted rank reads the dead attempt's gloo address of its peer and fails with "Connection
refused" (dist_llm/parallel/rendezvous.py). The first tests run the handshake on threads over a
real TCPStore already holding an earlier attempt's keys; the last one is the real thing: torchrun
with a restart, where rank 0 of the second attempt starts 3 s late so that rank 1 likely finds the
stale address first (before the fix this script failed 3 of 7 runs: "Connection refused"; the
handshake tests above catch the defect every time).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from dist_llm.launch.env import LaunchEnv
from dist_llm.parallel.rendezvous import NAMESPACE, agree_on_token, attempt_store, uses_agent_store
from helpers import REPO

TIMEOUT = timedelta(seconds=20)


def _attempt(port: int, world: int, timeout: timedelta = TIMEOUT) -> dict:
    """Run the handshake on ``world`` threads, each with its own client, as one attempt's ranks."""
    out: dict = {}

    def rank_main(rank: int) -> None:
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        try:
            out[rank] = agree_on_token(client, rank, world, timeout)
        except Exception as e:  # noqa: BLE001 - reported to the test
            out[rank] = e

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in reversed(range(world))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout.total_seconds() + 10)
    return out


@pytest.fixture
def agent_store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=TIMEOUT)


def test_every_attempt_agrees_on_a_new_token_despite_the_earlier_attempts_keys(agent_store):
    tokens = []
    for _ in range(3):  # three attempts on the same store, as under torchrun --max-restarts=2
        got = _attempt(agent_store.port, 4)
        assert sorted(got) == [0, 1, 2, 3] and len(set(got.values())) == 1, got
        tokens.append(got[0])
    assert len(set(tokens)) == 3, tokens  # never an earlier attempt's namespace
    # A dead attempt's rank left a join without a ready: the next attempt is not confused by it.
    agent_store.append(f"{NAMESPACE}/joins", "deadbeef ")
    got = _attempt(agent_store.port, 2)
    assert len(set(got.values())) == 1 and got[0] not in tokens


def test_rank_zero_names_the_missing_ranks_when_one_never_arrives(agent_store):
    client = dist.TCPStore("127.0.0.1", agent_store.port, is_master=False, timeout=TIMEOUT)
    with pytest.raises(RuntimeError, match=r"0 of 1 other ranks checked in within 1 s \(parallel.timeout_s\)"):
        agree_on_token(client, 0, 2, timedelta(seconds=1))


def test_only_torchrun_with_a_shared_agent_store_gets_a_namespace(monkeypatch):
    le = LaunchEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, node_rank=0,
                   master_addr="127.0.0.1", master_port=1, launcher="local")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert not uses_agent_store() and attempt_store(le, TIMEOUT) is None  # env:// as before
    assert uses_agent_store({"TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert not uses_agent_store({"TORCHELASTIC_USE_AGENT_STORE": "False"})


# Rank 1 crashes after attempt 0 has built its groups; in attempt 1, rank 0 starts late, so rank 1
# reaches gloo's connectFullMesh while only the dead attempt's address of rank 0 is in the store.
SCRIPT = """
import os, sys, time
import torch, torch.distributed as dist
from dist_llm.config.schema import ParallelConfig
from dist_llm.launch.env import read_launch_env
from dist_llm.parallel.layout import init_layout, shutdown
attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if attempt == 1 and rank == 0:
    time.sleep(3)
layout = init_layout(ParallelConfig(device="cpu", timeout_s=30, first_step_timeout_s=30), read_launch_env())
t = torch.ones(1)
dist.all_reduce(t)
group = dist.new_group([0, 1])
dist.all_reduce(t, group=group)
print(f"attempt {attempt} rank {rank} sum {t.item():.0f}", flush=True)
if attempt == 0 and rank == 1:
    os._exit(13)
dist.barrier()
shutdown()
"""


@pytest.mark.slow  # two torchrun attempts of 2 gloo ranks (~15 s); run under the shared lock
def test_torchrun_restart_with_a_late_rank_zero_connects_to_the_new_attempt(tmp_path: Path):
    script = tmp_path / "attempts.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "--max-restarts=1",
                           "--monitor-interval=0.5", str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "attempt 1 rank 0 sum 4" in out and "attempt 1 rank 1 sum 4" in out, out[-4000:]
    assert "Connection refused" not in out
