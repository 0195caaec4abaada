"""A fresh key namespace per torchrun attempt in the elastic agent's shared store.

Why: torchrun's c10d rendezvous (``--standalone`` and ``--rdzv-backend=c10d``) hosts one TCPStore in
the agent and hands its address to every attempt's workers (``TORCHELASTIC_USE_AGENT_STORE=True``);
the store outlives the workers, and in torch 2.5+ ``init_process_group`` uses it with no
per-attempt prefix. After ``--max-restarts`` restarts the workers of the new attempt find the keys
of the dead one: gloo reads a dead peer's listening address and fails in ``connectFullMesh``
("Connection refused"), and group creation can pass or wait on stale counters (seen as a hang
in DeepSpeed's ``new_group``). Whether the new peer overwrote its key first is a race, so the
failure is intermittent. ``TORCHELASTIC_RESTART_COUNT`` cannot name the attempt: each node's
agent counts its own restarts, so nodes can disagree.

So every attempt agrees on a new random token through a handshake no stale key can satisfy:
each rank > 0 appends a fresh nonce to a join list and waits for ``ack/<nonce>``; rank 0 answers
every nonce it sees with its token (answering an old attempt's nonce is harmless) until every
rank has checked in under the token. The process group then lives under ``dist_llm/<token>``.
"""
from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta
from typing import Mapping, Optional

import torch.distributed as dist

from dist_llm.launch.env import LaunchEnv

NAMESPACE = "dist_llm/attempt"
POLL_S = 0.02


def uses_agent_store(env: Optional[Mapping[str, str]] = None) -> bool:
    """True under torchrun's elastic agent when its TCPStore is shared with the workers."""
    env = os.environ if env is None else env
    return env.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)


def attempt_store(le: LaunchEnv, timeout: timedelta) -> Optional[dist.Store]:
    """The store ``init_process_group`` should use: a namespace of this attempt in the agent's
    store under torchrun, or None (let ``env://`` build one) under any other launcher."""
    if not uses_agent_store() or le.world_size < 2:
        return None
    agent = dist.TCPStore(le.master_addr, le.master_port, is_master=False, timeout=timeout)
    token = agree_on_token(agent, le.rank, le.world_size, timeout)
    return dist.PrefixStore(f"dist_llm/{token}", agent)


def agree_on_token(store: dist.Store, rank: int, world_size: int, timeout: timedelta) -> str:
    """Every rank returns rank 0's fresh token; keys left by earlier attempts cannot answer."""
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.append(f"{NAMESPACE}/joins", nonce + " ")
        store.wait([f"{NAMESPACE}/ack/{nonce}"], timeout)
        token = store.get(f"{NAMESPACE}/ack/{nonce}").decode()
        store.add(f"{NAMESPACE}/{token}/ready", 1)
        return token
    token = uuid.uuid4().hex
    answered: set = set()
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        if store.check([f"{NAMESPACE}/joins"]):
            for nonce in store.get(f"{NAMESPACE}/joins").decode().split():
                if nonce not in answered:
                    store.set(f"{NAMESPACE}/ack/{nonce}", token)
                    answered.add(nonce)
        ready = store.add(f"{NAMESPACE}/{token}/ready", 0)
        if ready == world_size - 1:
            return token
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"torchrun attempt handshake: {ready} of {world_size - 1} other ranks checked in within "
                f"{timeout.total_seconds():.0f} s (parallel.timeout_s); a rank did not start or cannot "
                f"reach the agent's store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")
        time.sleep(POLL_S)
