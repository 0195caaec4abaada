"""engine=ray on a 2-CPU local Ray cluster gives the same shards as the local engine."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_llm.config.store import compose_prepare
from dist_llm.prepare import run_prepare
from prepare_synthetic import planted_corpus, write_jsonl


def _shards(out: Path) -> dict:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.parent != out}


@pytest.mark.ray
@pytest.mark.slow
def test_ray_engine_equals_local(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    corpus = planted_corpus(300, seed=7)
    write_jsonl(corpus.docs, tmp_path / "in", files=4)
    ov = ["input=files", f"input.paths=[{tmp_path / 'in'}]", "filter=gopher", "filter.min_chars=0",
          "filter.min_words=20", "filter.min_alpha_fraction=0.6", "dedup.threshold=0.7", "tokenizer=bpe",
          "tokenizer.vocab_size=500", "pack.seq_len=64", "pack.samples_per_shard=200", "input.chunk_records=60",
          "split.val_fraction=0.1", "progress=off"]
    local = run_prepare(compose_prepare(ov + [f"output_dir={tmp_path / 'local'}", "workers=2"]))
    # The Ray side runs in a fresh interpreter: Ray caches process-wide settings (authentication
    # mode among them) from whatever cluster the test process talked to before.
    root = str(Path(__file__).resolve().parents[1])
    script = (
        "import json, sys, ray\n"
        "from dist_llm.config.store import compose_prepare\n"
        "from dist_llm.prepare import run_prepare\n"
        "ray.init(num_cpus=2, include_dashboard=False, _node_ip_address='127.0.0.1', log_to_driver=False,\n"
        "         runtime_env={'env_vars': {'PYTHONPATH': sys.argv[1]}})\n"
        "try:\n"
        "    assert ray.cluster_resources()['CPU'] == 2\n"
        "    r = run_prepare(compose_prepare(json.loads(sys.argv[2])))\n"
        "finally:\n"
        "    ray.shutdown()\n"
        "print('RESULT=' + json.dumps({'stats': r['stats'], 'splits': r['splits']}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", script, env["PYTHONPATH"],
                           json.dumps(ov + [f"output_dir={tmp_path / 'ray'}", "engine=ray", "workers=2"])],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    remote = json.loads(proc.stdout.split("RESULT=", 1)[1])
    local = json.loads(json.dumps({"stats": local["stats"], "splits": local["splits"]}))  # same JSON types
    assert remote["stats"] == local["stats"] and remote["splits"] == local["splits"]
    assert remote["stats"]["dropped"]["exact_dups"] == corpus.counts["exact_dups"]
    assert remote["splits"]["train"]["num_tokens"] > 0
    assert _shards(tmp_path / "ray") == _shards(tmp_path / "local")
