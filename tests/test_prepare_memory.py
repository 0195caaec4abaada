"""``memory_budget_mb``: the dedup index and the plan spill to disk, and nothing else changes.

In-process (``workers=1``: phases run inline, no pool) but for ``test_tiny_budget_with_worker_pool``
(two worker processes: run it under the heavy-run lock). A budget of
0.01 MB (10 kB) forces a dedup run per part and the on-disk plan on a 600-document corpus.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from dist_llm.config.prepare_schema import PrepareConfigError, validate_prepare
from dist_llm.config.store import compose_prepare
from dist_llm.prepare import Interrupted, run_prepare
from dist_llm.prepare.dedup import Deduper, SpilledKeys, SpillingU64Set, U64Set
from prepare_synthetic import TEST_FILTER, planted_corpus, write_jsonl

TINY = 0.01  # MB


def _overrides(inp: Path, out: Path, **extra: object) -> List[str]:
    ov = ["input=files", f"input.paths=[{inp}]", f"output_dir={out}", "filter=gopher", "filter.min_chars=0",
          f"filter.min_words={TEST_FILTER['min_words']}", f"filter.min_alpha_fraction={TEST_FILTER['min_alpha_fraction']}",
          f"filter.max_dup_line_fraction={TEST_FILTER['max_dup_line_fraction']}", "dedup.threshold=0.7",
          "tokenizer=bpe", "tokenizer.vocab_size=600", "pack.seq_len=64", "pack.samples_per_shard=300",
          "input.chunk_records=120", "split.val_fraction=0.1", "workers=1", "progress=off"]
    return ov + [f"{k}={v}" for k, v in extra.items()]


def _digests(out: Path) -> Dict[str, str]:
    """Every output file but the top manifest (it records the config, budget included)."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and ".work" not in p.parts)
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
            if p.name != "manifest.json" or p.parent != out}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spill")
    write_jsonl(planted_corpus(500, seed=5).docs, root / "in", files=3)
    return root


def test_spilled_keys_answer_like_the_hash_set(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(1, 2**64 - 1, size=5000, dtype=np.uint64)
    mem, spill = U64Set(), SpillingU64Set(tmp_path / "s", budget_bytes=64 * 300)  # a run every ~300 keys
    for batch in np.array_split(keys, 20):
        mem.add(batch)
        spill.add(batch)
    assert len(spill.disk.runs) >= 10 and len(spill) == len(mem) == 5000
    queries = np.concatenate([keys[::3], rng.integers(1, 2**64 - 1, size=3000, dtype=np.uint64)])
    assert np.array_equal(spill.contains(queries), mem.contains(queries))
    assert spill.contains(keys).all()
    # a run is read in blocks: queries straddling block boundaries still match
    small = SpilledKeys(tmp_path / "b")
    small.BLOCK = 7
    small.write_run(keys[:100])
    assert small.contains(keys[:100]).all() and not small.contains(keys[100:200]).any()


def test_deduper_decisions_identical_with_spill(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**63, size=(3000, 10), dtype=np.uint64)
    a, b = Deduper(True, True), Deduper(True, True, tmp_path / "dd", budget_bytes=20_000)
    counts = np.zeros(3, np.int64)
    for _ in range(20):
        idx = rng.integers(0, 3000, size=500)
        exact, bands = base[idx, 0].copy(), base[idx, 1:].copy()
        exact[::3] = rng.integers(0, 2**63, size=len(exact[::3]), dtype=np.uint64)  # new text, same bands: near
        bands[::7, 3] = rng.integers(0, 2**63, size=len(bands[::7]), dtype=np.uint64)
        ca, cb = a.decide(exact, bands), b.decide(exact, bands)
        assert np.array_equal(ca, cb)
        counts += np.bincount(ca, minlength=3)
    assert counts.min() > 50  # kept, exact and near duplicates all exercised
    assert len(b.lsh.disk.runs) >= 5 and len(b.exact_seen.disk.runs) >= 2


def test_tiny_budget_output_identical_to_in_memory(corpus: Path, tmp_path: Path) -> None:
    mem = run_prepare(compose_prepare(_overrides(corpus / "in", tmp_path / "mem", memory_budget_mb=0)))
    cfg = compose_prepare(_overrides(corpus / "in", tmp_path / "spill", memory_budget_mb=TINY, keep_work=True))
    spill = run_prepare(cfg)
    work = tmp_path / "spill" / ".work"
    assert len(list((work / "dedup" / "lsh").glob("run-*.u64"))) >= 3  # a run per part: the spill happened
    assert sorted(p.name for p in (work / "plan").glob("*.bin")) == [
        f"{s}.{c}.bin" for s in ("train", "val") for c in ("ntok", "off", "part")]
    assert len([k for k in _digests(tmp_path / "mem") if k.endswith(".tar")]) >= 5
    assert _digests(tmp_path / "spill") == _digests(tmp_path / "mem")
    assert spill["stats"] == mem["stats"] and spill["splits"] == mem["splits"]
    assert spill["fingerprint"] == mem["fingerprint"]  # the budget is not part of what the output is
    assert mem["stats"]["dropped"]["exact_dups"] > 0 and mem["stats"]["dropped"]["near_dups"] > 0


def test_resume_with_spill_equals_uninterrupted(corpus: Path, tmp_path: Path) -> None:
    want = run_prepare(compose_prepare(_overrides(corpus / "in", tmp_path / "mem", memory_budget_mb=0)))
    out = tmp_path / "b"
    with pytest.raises(Interrupted):
        run_prepare(compose_prepare(_overrides(corpus / "in", out, memory_budget_mb=TINY,
                                               **{"debug.stop_after_parts": 3})))
    assert list((out / ".work" / "dedup").rglob("run-*.u64"))  # interrupted with runs on disk
    with pytest.raises(Interrupted):
        run_prepare(compose_prepare(_overrides(corpus / "in", out, memory_budget_mb=TINY,
                                               **{"debug.stop_after_shards": 2})))
    # resumed with another budget: the index is rebuilt from the parts, the output is the same
    got = run_prepare(compose_prepare(_overrides(corpus / "in", out, memory_budget_mb=TINY * 3)))
    assert _digests(out) == _digests(tmp_path / "mem") and got["stats"] == want["stats"]


def test_negative_budget_is_rejected_naming_the_field(tmp_path: Path) -> None:
    cfg = compose_prepare(_overrides(tmp_path, tmp_path / "o", memory_budget_mb=-1))
    with pytest.raises(PrepareConfigError, match=r"memory_budget_mb=-1.*>= 0"):
        validate_prepare(cfg)


@pytest.mark.parametrize("kind", ["bert", "image"])
def test_spilled_plan_identical_for_bert_and_images(kind: str, corpus: Path, tmp_path: Path) -> None:
    """The on-disk plan has per-kind columns (sentences; 2-D image shapes, labels): same shards."""
    if kind == "bert":
        base = _overrides(corpus / "in", tmp_path / "x", **{"pack": "bert", "tokenizer": "char",
                                                            "pack.samples_per_shard": 200})
    else:
        base = ["input=digits", "pack=image", "dedup=none", "split.val_fraction=0.1", "pack.samples_per_shard=500",
                "workers=1", "progress=off"]
    runs = {}
    for name, mb in (("mem", 0), ("spill", TINY)):
        out = tmp_path / name
        runs[name] = run_prepare(compose_prepare([*base, f"output_dir={out}", f"memory_budget_mb={mb}",
                                                  "keep_work=true"]))
    assert list((tmp_path / "spill" / ".work" / "plan").glob("*.bin")) and not (tmp_path / "mem" / ".work" / "plan").exists()
    assert _digests(tmp_path / "spill") == _digests(tmp_path / "mem")
    assert runs["spill"]["stats"] == runs["mem"]["stats"] and runs["mem"]["splits"]["train"]["shards"] >= 2


def test_tiny_budget_with_worker_pool(corpus: Path, tmp_path: Path) -> None:
    """``workers=2`` (a process pool; run it under the heavy-run lock): forked writers read the
    memory-mapped plan; same shards as the in-memory inline run."""
    run_prepare(compose_prepare(_overrides(corpus / "in", tmp_path / "mem", memory_budget_mb=0)))
    run_prepare(compose_prepare(_overrides(corpus / "in", tmp_path / "pool", memory_budget_mb=TINY, workers=2)))
    assert _digests(tmp_path / "pool") == _digests(tmp_path / "mem")
