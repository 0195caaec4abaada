"""Peak RSS of ``dist-llm prepare`` at 1x and 10x the same corpus (issue 12, item 6).

The corpus is ``tests/prepare_synthetic.py``'s planted corpus (pseudo-word documents with
planted exact / near duplicates and junk): the 1x corpus is one block of ``--docs`` originals
(seed 11, as in ``bench/prepare_bench.py``: 15000 originals, ~33 MB of JSONL); the 10x corpus is
that block plus nine more of the same size (seeds 12..20), so it holds the 1x corpus. Each run is
a fresh ``dist-llm prepare`` process (BPE tokenizer file trained once on the 1x corpus, gopher
filters, exact + near dedup, ``workers=2``); a sampler thread reads ``/proc/<pid>/status`` of the
main process and of every child (workers) every 50 ms and keeps each one's ``VmHWM`` (kernel
peak RSS) and the peak of its anonymous memory (``RssAnon``: heap, not the page cache of
memory-mapped part files, which the kernel can drop at will).

    python -m bench.prepare_memory [--docs 15000] [--scale 10] [--budget-mb 64] [--out bench/results/prepare_memory.json]

Prints a table and the ratio 10x / 1x of the main process' peak; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the planted-corpus generator is a test fixture

from prepare_synthetic import planted_corpus, write_jsonl  # noqa: E402

SEQ, PER_SHARD = 256, 1024


def make_corpus(dir: Path, docs: int, blocks: int) -> int:
    """``blocks`` planted blocks of ``docs`` originals (seeds 11, 12, ...), 8 files each."""
    for b in range(blocks):
        c = planted_corpus(docs, seed=11 + b)
        write_jsonl(c.docs, dir / f"block{b:02d}", files=8)
    return sum(p.stat().st_size for p in dir.rglob("*.jsonl"))


def tokenizer_file(inp: Path, out: Path, max_docs: int = 4000) -> Path:
    from dist_llm.data.tokenizer import train_bpe

    def texts():
        n = 0
        for p in sorted(inp.rglob("*.jsonl")):
            for line in open(p, encoding="utf-8"):
                yield json.loads(line)["text"]
                n += 1
                if n >= max_docs:
                    return
    train_bpe(texts(), 8192, out)
    return out


def _status(pid: int) -> Dict[str, int]:
    """``VmHWM`` / ``VmRSS`` / ``RssAnon`` / ``RssFile`` of a process in kB (empty once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in f)
                    if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
    except (OSError, ValueError):
        return {}


def _children(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


class Sampler(threading.Thread):
    """Peak ``VmHWM`` and ``RssAnon`` of a process and, separately, of its largest child."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.stop = pid, every, threading.Event()
        self.main = {"hwm_kb": 0, "anon_kb": 0}
        self.worker = {"hwm_kb": 0, "anon_kb": 0}

    def _take(self, into: Dict[str, int], st: Dict[str, int]) -> None:
        into["hwm_kb"] = max(into["hwm_kb"], st.get("VmHWM", 0))
        into["anon_kb"] = max(into["anon_kb"], st.get("RssAnon", 0))

    def run(self) -> None:
        while not self.stop.is_set():
            self._take(self.main, _status(self.pid))
            for c in _children(self.pid):
                self._take(self.worker, _status(c))
            time.sleep(self.every)


def run_prepare(inp: Path, tok: Path, out: Path, budget_mb: int) -> Dict[str, float]:
    """One ``dist-llm prepare`` in a fresh process, sampled; peaks in MB and its throughput."""
    args = ["input=files", f"input.paths=[{inp}]", f"output_dir={out}", "filter=gopher", "tokenizer=file",
            f"tokenizer.path={tok}", "tokenizer.eos_token='<|eos|>'", f"pack.seq_len={SEQ}",
            f"pack.samples_per_shard={PER_SHARD}", "split.val_fraction=0.01", "workers=2", "progress=off"]
    if budget_mb >= 0:
        args.append(f"memory_budget_mb={budget_mb}")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               TOKENIZERS_PARALLELISM="false")
    code = "import sys; from dist_llm.cli.main import main; sys.exit(main(['prepare'] + sys.argv[1:]))"
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    s = Sampler(p.pid)
    s.start()
    stdout, stderr = p.communicate()
    secs = time.perf_counter() - t0
    s.stop.set()
    s.join()
    if p.returncode != 0:
        raise RuntimeError(f"dist-llm prepare failed ({p.returncode}):\n{stderr[-3000:]}")
    m = json.loads((out / "manifest.json").read_text())
    return {"seconds": round(secs, 2), "input_mb": round(m["stats"]["input_bytes"] / 1e6, 1),
            "mb_s": round(m["stats"]["input_bytes"] / 1e6 / secs, 2), "documents": m["stats"]["documents"],
            "main_peak_mb": round(s.main["hwm_kb"] / 1024, 1), "main_anon_mb": round(s.main["anon_kb"] / 1024, 1),
            "worker_peak_mb": round(s.worker["hwm_kb"] / 1024, 1),
            "worker_anon_mb": round(s.worker["anon_kb"] / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=15000, help="originals per block (15000 = ~33 MB)")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--budget-mb", type=int, default=-1,
                    help="memory_budget_mb for both runs; -1 = the config's default")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prepare_memory.json"))
    a = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        make_corpus(t / "in", a.docs, a.scale)
        tok = tokenizer_file(t / "in" / "block00", t / "tok.json")
        for name, inp in (("1x", t / "in" / "block00"), (f"{a.scale}x", t / "in")):
            rows[name] = run_prepare(inp, tok, t / f"out-{name}", a.budget_mb)
            print(f"{name}: {rows[name]}", flush=True)
    one, big = rows["1x"], rows[f"{a.scale}x"]
    ratio = big["main_peak_mb"] / one["main_peak_mb"]
    wratio = big["worker_peak_mb"] / max(one["worker_peak_mb"], 1e-9)
    print(f"\n{'corpus':>7} {'input MB':>9} {'s':>7} {'MB/s':>6} {'main peak':>10} {'main anon':>10} "
          f"{'worker peak':>12} {'worker anon':>12}")
    for name, r in rows.items():
        print(f"{name:>7} {r['input_mb']:9.1f} {r['seconds']:7.1f} {r['mb_s']:6.2f} {r['main_peak_mb']:8.0f}MB "
              f"{r['main_anon_mb']:8.0f}MB {r['worker_peak_mb']:10.0f}MB {r['worker_anon_mb']:10.0f}MB")
    print(f"prepare_memory main peak ratio {a.scale}x/1x = {ratio:.2f} (target <= 1.3); "
          f"largest worker {wratio:.2f}; cores {os.cpu_count()}")
    res = {"machine": {"cores": os.cpu_count()}, "docs_per_block": a.docs, "scale": a.scale,
           "budget_mb": a.budget_mb, "runs": rows, "main_ratio": round(ratio, 3), "worker_ratio": round(wratio, 3)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
