"""End to end: the real CLI on a 2-rank gloo mock cluster trains from shards served by a real HTTP
server (http.server in a thread of this test) and read by a ``pipe:cat`` command (with a shard
cache), and gets exactly the losses of the same shards read from their directory.

Tolerance: none. The bytes are verified against the same sha256, so the batches, and therefore
every operation of the run, are the same as the directory run's; the losses must be bit-identical.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY, metrics, run_cli
from shard_server import ShardServer

pytestmark = pytest.mark.slow

STEPS = 8
COMMON = [f"train.max_steps={STEPS}", "train.eval_every=4", "train.checkpoint.every=0",
          "train.checkpoint.save_at_end=false", "launcher.nproc=2"]


def test_http_and_pipe_sources_train_exactly_like_the_directory(workdir: Path):
    data = workdir / "data" / "stdlib"
    run_cli(["train", *TINY, "name=dir", *COMMON], cwd=workdir)
    cache = workdir / "cache"
    with ShardServer(data) as srv:
        run_cli(["train", *TINY, "name=http", *COMMON, "data.build_embedded=false",
                 f"data.train=[{{path:'{srv.url}/train'}}]", f"data.val='{srv.url}/val'"], cwd=workdir)
        served = [p for p in srv.requests if p.endswith(".tar")]
    run_cli(["train", *TINY, "name=pipe", *COMMON, "data.build_embedded=false", f"data.cache_dir={cache}",
             f"data.train=[{{path:'pipe:cat {data}/train/{{name}}'}}]", f"data.val='pipe:cat {data}/val/{{name}}'"],
            cwd=workdir)
    assert served and all(p.startswith(("/train/shard-", "/val/shard-")) for p in served)
    assert len(list(cache.rglob("*.tar"))) >= 2  # verified shards kept by sha256
    for key in ("train/loss", "val/loss"):
        ref = metrics(workdir / "runs" / "dir", key)
        assert ref and (key != "train/loss" or sorted(ref) == list(range(1, STEPS + 1))), key
        for name in ("http", "pipe"):
            assert metrics(workdir / "runs" / name, key) == ref, (name, key)
