"""engine=ray on a 2-CPU local Ray cluster gives the same shards as the local engine."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from dist_llm.config.store import compose_prepare
from dist_llm.data.prepare import run_prepare
from dist_llm.data.prepare.synthetic import planted_corpus, write_jsonl


def _shards(out: Path) -> dict:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.parent != out}


@pytest.mark.ray
@pytest.mark.slow
def test_ray_engine_equals_local(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    corpus = planted_corpus(300, seed=7)
    write_jsonl(corpus.docs, tmp_path / "in", files=4)
    ov = ["input=files", f"input.paths=[{tmp_path / 'in'}]", "filter=gopher", "filter.min_chars=0",
          "filter.min_words=20", "filter.min_alpha_fraction=0.6", "dedup.threshold=0.7", "tokenizer=bpe",
          "tokenizer.vocab_size=500", "pack.seq_len=64", "pack.samples_per_shard=200", "input.chunk_records=60",
          "split.val_fraction=0.1", "progress=off"]
    local = run_prepare(compose_prepare(ov + [f"output_dir={tmp_path / 'local'}", "workers=2"]))
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    try:
        assert ray.cluster_resources()["CPU"] == 2
        remote = run_prepare(compose_prepare(ov + [f"output_dir={tmp_path / 'ray'}", "engine=ray", "workers=2"]))
    finally:
        ray.shutdown()
    assert remote["stats"] == local["stats"] and remote["splits"] == local["splits"]
    assert remote["stats"]["dropped"]["exact_dups"] == corpus.counts["exact_dups"]
    assert remote["splits"]["train"]["num_tokens"] > 0
    assert _shards(tmp_path / "ray") == _shards(tmp_path / "local")
