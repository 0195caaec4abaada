"""Raw text -> shards throughput: the prepare pipeline vs a plain single-process loop.

Both read the same generated JSONL corpus, tokenize with the same Hugging Face `tokenizers`
BPE file and write the same shard format (ShardWriter / write_shard). The pipeline also
cleans, filters (Gopher rules) and deduplicates (exact + MinHash LSH). Two plain loops are
timed: one ``encode`` per document (the headline baseline) and ``encode_batch_fast`` over
1000-document batches with the Rust thread pool off (still one core). Also measured: peak RSS
of the pipeline on a 1x and a 10x corpus (in fresh processes), and MinHash signatures with
NumPy (ours) vs datasketch.

The default corpus is 15000 originals (~33 MB of JSONL): fixed costs (process start-up,
tokenizer load, planning) are ~0.2 s, which a real corpus of gigabytes amortises; at ~7 MB
they are a visible share of the pipeline's time (``--docs 3000`` shows it).

    PYTHONPATH=. .venv/bin/python bench/prepare_bench.py [--docs 15000] [--repeats 3] [--workers 0]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the planted-corpus generator is a test fixture

from prepare_synthetic import planted_corpus, write_jsonl  # noqa: E402

SEQ, PER_SHARD = 256, 1024


def corpus(dir: Path, docs: int) -> int:
    c = planted_corpus(docs, seed=11)
    write_jsonl(c.docs, dir, files=8)
    return sum(p.stat().st_size for p in dir.glob("*.jsonl"))


def tokenizer_file(inp: Path, out: Path) -> Path:
    from dist_llm.data.tokenizer import train_bpe

    texts = (json.loads(line)["text"] for p in sorted(inp.glob("*.jsonl")) for line in open(p))
    train_bpe(texts, 8192, out)
    return out


def plain_loop(inp: Path, tok_path: Path, out: Path, batch: int = 0) -> float:
    """The baseline: one process, no cleaning, filtering or dedup. ``batch=0`` encodes one
    document at a time; ``batch=N`` uses ``encode_batch_fast`` per N documents with the
    tokenizer's Rust threads off (still one core)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    from dist_llm.data.shards import ShardWriter

    t0 = time.perf_counter()
    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id("<|eos|>")
    buf: list = []
    L = SEQ + 1
    with ShardWriter(out, SEQ, tok.get_vocab_size(), PER_SHARD, eos_id=eos) as w:
        def emit(encodings) -> None:
            for e in encodings:
                buf.extend(e.ids)
                buf.append(eos)
                while len(buf) >= L:
                    w.add(np.array(buf[:L]))
                    del buf[:L]

        texts: list = []
        for p in sorted(inp.glob("*.jsonl")):
            with open(p, encoding="utf-8") as f:
                for line in f:
                    text = json.loads(line)["text"]
                    if not batch:
                        emit([tok.encode(text, add_special_tokens=False)])
                        continue
                    texts.append(text)
                    if len(texts) >= batch:
                        emit(tok.encode_batch_fast(texts, add_special_tokens=False))
                        texts = []
        if texts:
            emit(tok.encode_batch_fast(texts, add_special_tokens=False))
    return time.perf_counter() - t0


def pipeline(inp: Path, tok_path: Path, out: Path, workers: int) -> dict:
    from dist_llm.config.store import compose_prepare
    from dist_llm.prepare import run_prepare

    cfg = compose_prepare(["input=files", f"input.paths=[{inp}]", f"output_dir={out}", "filter=gopher",
                           "tokenizer=file", f"tokenizer.path={tok_path}", "tokenizer.eos_token='<|eos|>'",
                           f"pack.seq_len={SEQ}", f"pack.samples_per_shard={PER_SHARD}", "split.val_fraction=0.01",
                           f"workers={workers}", "progress=off"])
    t0 = time.perf_counter()
    r = run_prepare(cfg)
    return {"seconds": time.perf_counter() - t0, "stats": r["stats"], "splits": r["splits"], "phases": r["seconds"]}


def minhash_compare(inp: Path, n: int = 2000) -> dict:
    from dist_llm.prepare.dedup import MinHasher, shingle_hashes, words_and_hashes

    texts = [json.loads(line)["text"] for line in open(sorted(inp.glob("*.jsonl"))[0])][:n]
    mh = MinHasher(128, threshold=0.8)
    t0 = time.perf_counter()
    sh = [shingle_hashes(words_and_hashes(t)[1], 5) for t in texts]
    mh.band_keys(mh.signatures(sh))
    ours = time.perf_counter() - t0
    res = {"docs": len(texts), "numpy_docs_per_s": round(len(texts) / ours)}
    try:
        from datasketch import MinHash
    except ImportError:
        res["datasketch"] = "not installed"
        return res
    t0 = time.perf_counter()
    for t in texts:
        w = t.lower().split()
        m = MinHash(num_perm=128)
        m.update_batch([" ".join(w[i:i + 5]).encode() for i in range(max(1, len(w) - 4))])
    res["datasketch_docs_per_s"] = round(len(texts) / (time.perf_counter() - t0))
    return res


def rss_child(inp: Path, tok_path: Path, out: Path, workers: int) -> dict:
    """Run the pipeline in a fresh process; peak RSS of it and of its largest worker."""
    code = (f"import sys, json, resource; sys.path.insert(0, {str(ROOT)!r}); "
            f"from bench.prepare_bench import pipeline; from pathlib import Path; "
            f"r = pipeline(Path({str(inp)!r}), Path({str(tok_path)!r}), Path({str(out)!r}), {workers}); "
            f"print(json.dumps({{'seconds': r['seconds'], "
            f"'main_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
            f"'worker_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=15000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--skip-rss", action="store_true")
    a = ap.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # every timed loop is one core (the pipeline: one per worker)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        size = corpus(t / "in", a.docs)
        tok = tokenizer_file(t / "in", t / "tok.json")
        plain, batched, pipe, phases, last = [], [], [], [], {}
        for i in range(a.repeats):
            plain.append(plain_loop(t / "in", tok, t / f"plain{i}"))
            batched.append(plain_loop(t / "in", tok, t / f"batched{i}", batch=1000))
            last = pipeline(t / "in", tok, t / f"pipe{i}", a.workers)
            pipe.append(last["seconds"])
            phases.append(last["phases"])
        mb = size / 1e6
        p_med, b_med, q_med = statistics.median(plain), statistics.median(batched), statistics.median(pipe)
        ph = phases[pipe.index(q_med)] if q_med in pipe else phases[-1]
        print(f"corpus: {mb:.1f} MB JSONL, {a.docs} originals + planted dups/junk; cores: {os.cpu_count()}")
        print(f"plain loop : {mb / p_med:7.2f} MB/s  (median of {a.repeats}: {[round(x, 2) for x in plain]} s), "
              f"encode per document")
        print(f"plain batch: {mb / b_med:7.2f} MB/s  (median of {a.repeats}: {[round(x, 2) for x in batched]} s), "
              f"encode_batch_fast x1000, one thread")
        print(f"pipeline   : {mb / q_med:7.2f} MB/s  (median of {a.repeats}: {[round(x, 2) for x in pipe]} s), "
              f"speed-up {p_med / q_med:.2f}x (vs batch {b_med / q_med:.2f}x), with cleaning + gopher filters + "
              f"exact/near dedup; phase A {ph['process']:.2f} s of {ph['total']:.2f} s")
        st = last["stats"]
        print(f"pipeline dropped: {st['dropped']}, dedup rate {st['dedup_rate']:.3f}")
        print(f"minhash: {minhash_compare(t / 'in')}")
        if not a.skip_rss:
            one = rss_child(t / "in", tok, t / "rss1", a.workers)
            size10 = corpus(t / "in10", a.docs * 10)
            ten = rss_child(t / "in10", tok, t / "rss10", a.workers)
            print(f"peak RSS 1x  ({mb:.0f} MB): main {one['main_mb']:.0f} MB, largest worker {one['worker_mb']:.0f} MB, "
                  f"{one['seconds']:.1f} s")
            print(f"peak RSS 10x ({size10 / 1e6:.0f} MB): main {ten['main_mb']:.0f} MB, largest worker "
                  f"{ten['worker_mb']:.0f} MB, {ten['seconds']:.1f} s")


if __name__ == "__main__":
    main()
