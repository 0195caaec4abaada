"""The local mock cluster: N ranks as processes on this machine (CPU, or sharing one GPU).

Like torchrun, but with the contract a user needs on a laptop: if any rank dies, the others are
killed at once (no rank waits forever in a collective), the job's exit code is the first
failure's, and signals sent to the launcher (Ctrl-C, Slurm's USR1/TERM) reach every rank.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from dist_llm.launch.env import free_port

log = logging.getLogger("dist_llm.launch")

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def spawn_local(nproc: int, worker_argv: List[str], master_port: int = 0,
                extra_env: Optional[dict] = None, poll_s: float = 0.2) -> int:
    """Run ``python <worker_argv>`` as ``nproc`` ranks; return the job's exit code."""
    port = master_port or free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs: List[subprocess.Popen] = []
    for rank in range(nproc):
        env = dict(os.environ)
        env.update(extra_env or {})
        env.update({"RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port), "DIST_LLM_LAUNCHER": "local"})
        env.setdefault("OMP_NUM_THREADS", str(threads))
        procs.append(subprocess.Popen([sys.executable, *worker_argv], env=env))

    def forward(signum, frame):  # noqa: ARG001 - signal API
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                if code < 0:  # killed by a signal: report it as a shell would (128 + signal number)
                    log.error("rank %d was killed by signal %d", rank, -code)
                    code = 128 - code
                alive = [p for p in procs if p.poll() is None]
                if alive:
                    # Give peers a moment to finish by themselves (e.g. all ranks exit with the
                    # preemption code together), then kill the rest: a rank blocked in a collective
                    # with a dead peer would otherwise wait for the full collective timeout.
                    deadline = time.monotonic() + 3.0
                    while time.monotonic() < deadline and any(p.poll() is None for p in alive):
                        time.sleep(poll_s)
                    for p in alive:
                        if p.poll() is None:
                            log.error("rank %d exited with %d: killing rank pid %d", rank, code, p.pid)
                            p.kill()
                    for p in alive:
                        p.wait()
                return code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll_s)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
