"""``dist-llm prepare``: raw text or images to cleaned, deduplicated, tokenized shards.

Phases, so that everything heavy is parallel and everything ordered is cheap:

A. *process* (parallel): read chunks, decode, clean, filter, hash, MinHash; each chunk becomes
   a part file under ``<output_dir>/.work/parts`` (skipped when present).
B. *plan* (one process, metadata only): exact/near dedup in input order and the train/val
   split; then (A2, parallel) the documents kept are tokenized, part by part (duplicates never
   are), and the plan records where every kept document's tokens are.
C. *write* (parallel): each shard is built from the plan alone and written atomically; a
   done-marker with its sha256 lets a re-run skip it.

Output is a function of (config, inputs) only: not of the engine, the number of workers or
where a previous run was interrupted. Memory stays flat: the reader keeps at most
``2 x workers`` chunks in flight and part files are memory-mapped; only the dedup index
(~16 bytes per key) and the plan (~40 bytes per kept document) grow with the corpus.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from dist_llm.config.prepare_schema import PrepareConfig, validate_prepare
from dist_llm.data.prepare import pack as P
from dist_llm.data.prepare.process import (WorkerContext, init_worker, part_done, part_name, part_tokenized, run_chunk,
                                           run_tokenize)
from dist_llm.data.prepare.readers import InputFile, discover, plan_units, read_unit, stdlib_files
from dist_llm.data.prepare.tokenize import build_tokenizer, special_ids, vocab_size
from dist_llm.data.shards import (FORMAT, IMAGES_FORMAT, MANIFEST, PAIRS_FORMAT, dtype_for_vocab, sha256_bytes,
                                  sha256_file, token_manifest, write_manifest)

DATASET_FORMAT = "dist-llm-dataset/1"
_WORK_FORMAT = "parts/2"  # the layout of .work/parts (text, then tokens after dedup); older work is discarded
_RUNTIME_ONLY = ("output_dir", "engine", "workers", "ray_address", "progress", "keep_work")


class Interrupted(RuntimeError):
    """Raised by the test hook ``stop_after`` to simulate a crash at a chosen point."""


def config_dict(cfg: PrepareConfig) -> Dict[str, Any]:
    from dist_llm.config.store import config_to_dict

    return config_to_dict(cfg)


def output_fingerprint(cfg: PrepareConfig) -> str:
    """Hash of the fields that change the output (not engine, workers, progress...)."""
    d = {k: v for k, v in config_dict(cfg).items() if k not in _RUNTIME_ONLY}
    return sha256_bytes(json.dumps(d, sort_keys=True).encode())[:16]


def resolve_inputs(cfg: PrepareConfig, work: Path) -> Tuple[List[InputFile], List[str], Optional[str]]:
    """Input files, class names (images) and the labels file (npy); embedded sources materialised."""
    inp = cfg.input
    if inp.embedded == "stdlib":
        return stdlib_files(inp.embedded_max_bytes), [], None
    if inp.embedded == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        imgs = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 grey levels to 0..255
        work.mkdir(parents=True, exist_ok=True)
        np.save(work / "digits-images.npy", imgs)
        np.save(work / "digits-labels.npy", d.target.astype(np.int64))
        return ([InputFile(str(work / "digits-images.npy"), "npy")], [str(c) for c in d.target_names],
                str(work / "digits-labels.npy"))
    files = discover(inp.paths, inp.format)
    if inp.txt_mode == "line":
        files = [InputFile(f.path, "txt-line", f.label, f.size) if f.format == "txt" else f for f in files]
    classes: List[str] = []
    if inp.format == "images":
        from dist_llm.data.prepare.readers import image_classes

        classes = image_classes(inp.paths)
    return files, classes, inp.npy_labels


class LocalEngine:
    """``multiprocessing`` (spawn-safe 'fork' where available); ``workers=1`` runs inline."""

    def __init__(self, workers: int) -> None:
        self.workers = workers or os.cpu_count() or 1

    def _pool(self, init: Callable, arg: Any):
        import multiprocessing as mp

        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        return mp.get_context(method).Pool(self.workers, initializer=init, initargs=(arg,))

    @contextmanager
    def session(self, init: Callable, arg: Any) -> Iterator[Any]:
        """A pool (``apply_async(fn, args).get()``) whose workers ran ``init(arg)``; inline for 1 worker."""
        if self.workers == 1:
            init(arg)
            yield _Inline()
            return
        with self._pool(init, arg) as pool:
            yield pool

    def map_ordered_bounded(self, init: Callable, arg: Any, fn: Callable, tasks: Iterator[Any]) -> Iterator[Any]:
        """Results in task order, at most ``2 x workers`` tasks in flight (flat memory)."""
        if self.workers == 1:
            init(arg)
            for t in tasks:
                yield fn(t)
            return
        with self._pool(init, arg) as pool:
            q: deque = deque()
            for t in tasks:
                q.append(pool.apply_async(fn, (t,)))
                if len(q) >= 2 * self.workers:
                    yield q.popleft().get()
            while q:
                yield q.popleft().get()


class _Lazy:
    def __init__(self, fn: Callable, args: tuple) -> None:
        self.fn, self.args = fn, args

    def get(self) -> Any:
        return self.fn(*self.args)


class _Inline:
    """``workers=1``: tasks run in this process, when their result is asked for (in order)."""

    def apply_async(self, fn: Callable, args: tuple) -> _Lazy:
        return _Lazy(fn, args)


_BUILDER: Optional[P.ShardBuilder] = None


def _init_builder(b: P.ShardBuilder) -> None:
    global _BUILDER
    _BUILDER = b


def _write_job(args: Tuple[P.ShardJob, str]) -> Tuple[P.ShardJob, Dict[str, Any]]:
    job, kind = args
    assert _BUILDER is not None
    return job, _BUILDER.write(job, kind)


def _clean_chunk(t: Tuple[str, list, List[str]]) -> List[str]:
    """Cleaned, filter-passing texts of a chunk (tokenizer training input)."""
    from dist_llm.data.prepare import process as proc
    from dist_llm.data.prepare.dedup import word_table

    w = proc._WORKER
    assert w is not None
    texts = [text for text, _ in w.texts(t[1], t[2]) if text]
    if not w.filter.enabled:
        return texts
    return [text for text, bad in zip(texts, w.filter.check_many(texts, word_table(texts))) if bad is None]


def _sample_texts(engine: Any, ctx: WorkerContext, chunks: Callable) -> Callable:
    def sample(max_bytes: int) -> Iterator[str]:
        got = 0
        for texts in engine.map_ordered_bounded(init_worker, ctx, _clean_chunk, chunks(skip_done=False)):
            for t in texts:
                yield t
                got += len(t.encode("utf-8"))
                if got >= max_bytes:
                    return
    return sample


def run_prepare(cfg: PrepareConfig, stop_after: Optional[Tuple[str, int]] = None,
                engine: Optional[Any] = None) -> Dict[str, Any]:
    """Prepare ``cfg.output_dir``; returns the dataset manifest (also ``<output_dir>/manifest.json``).

    ``stop_after=("parts"|"shards", n)`` raises :class:`Interrupted` after ``n`` new parts or
    shards (tests use it to check that a resumed run equals an uninterrupted one).
    """
    validate_prepare(cfg)
    t0 = time.time()
    out = Path(cfg.output_dir)
    work = out / ".work"
    fp = output_fingerprint(cfg)
    done = out / MANIFEST
    if done.is_file():
        m = json.loads(done.read_text())
        if m.get("fingerprint") == fp and all((out / s / MANIFEST).is_file() for s in P.SPLITS):
            return {**m, "skipped": True}
        done.unlink()
    for s in P.SPLITS:  # a rebuild must not leave a stale, complete-looking split
        (out / s / MANIFEST).unlink(missing_ok=True)
    stamp = work / "fingerprint"
    work_id = f"{fp} {_WORK_FORMAT}"
    if stamp.is_file() and stamp.read_text() != work_id:
        shutil.rmtree(work)  # an unfinished run of another config: its parts are useless
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(work_id)
    if engine is None:
        if cfg.engine == "ray":
            from dist_llm.data.prepare.ray_engine import RayEngine

            engine = RayEngine(cfg.ray_address, cfg.workers)
        else:
            engine = LocalEngine(cfg.workers)

    files, classes, labels = resolve_inputs(cfg, work)
    paths = [f.path for f in files]
    units = plan_units(files, cfg.input.chunk_records, cfg.input.chunk_bytes)

    def chunks(skip_done: bool = True, markers: bool = False) -> Iterator[Any]:
        """``(name, records, paths)`` of the parts to make; with ``markers``, ``(name, records or
        None)`` of every part in input order (None: already on disk)."""
        for u, unit in enumerate(units):
            for k, records in read_unit(unit, files, cfg.input.chunk_records, cfg.input.chunk_bytes,
                                        cfg.input.text_field, labels):
                name = part_name(u, k)
                done = skip_done and part_done(work, name)
                if markers:
                    yield name, None if done else records
                elif not done:
                    yield name, records, paths

    base_ctx = WorkerContext(cfg=cfg, work_dir=str(work), tokenizer_meta=None, tokenizer_dir=str(out))
    if cfg.pack.kind == "image":
        tok_meta: Dict[str, Any] = {"kind": "image", "classes": classes}
    else:
        tok_meta = build_tokenizer(cfg, out, work, _sample_texts(engine, base_ctx, chunks))
    ctx = WorkerContext(cfg=cfg, work_dir=str(work), tokenizer_meta=tok_meta if cfg.pack.kind != "image" else None,
                        tokenizer_dir=str(out))

    # Phase A (+ B's dedup decisions in input order + A2: tokenize what dedup keeps)
    total_bytes = sum(f.size for f in files)
    bar = _progress(cfg, total_bytes)
    is_text = cfg.pack.kind != "image"
    decider = P.Decider(cfg, work)
    parts: List[str] = []
    decisions: List[P.Decision] = []
    t_a = t_b = time.time()
    if hasattr(engine, "process_units"):  # Ray: workers read their own units; then the phases in turn
        engine.process_units(ctx, files, units, labels)
        parts = sorted(p.name[: -len(".meta.npz")] for p in (work / "parts").glob("*.meta.npz"))
        t_a = time.time()
        decisions = [decider.add(name) for name in parts]
        t_b = time.time()
        if is_text:
            engine.tokenize_parts(ctx, [(n, d.keep) for n, d in zip(parts, decisions) if not part_tokenized(work, n)])
    else:
        # One pool does both kinds of task: a part is decided as soon as it and every part before it
        # are processed, and its tokenization is queued right away, behind the chunks in flight.
        new_parts = 0
        with engine.session(init_worker, ctx) as pool:
            inflight: deque = deque()
            tokenizing: List[Any] = []

            def settle(name: str, res: Any) -> None:
                nonlocal new_parts
                if res is not None:
                    r = res.get()
                    new_parts += 1
                    if bar is not None:
                        bar.update(r["bytes"])
                        bar.set_postfix(docs=r["records"], refresh=False)
                    if stop_after and stop_after[0] == "parts" and new_parts >= stop_after[1]:
                        raise Interrupted(f"stopped after {new_parts} parts")
                d = decider.add(name)
                parts.append(name)
                decisions.append(d)
                if is_text and not part_tokenized(work, name):
                    tokenizing.append(pool.apply_async(run_tokenize, ((name, d.keep),)))

            for name, records in chunks(skip_done=True, markers=True):
                res = None if records is None else pool.apply_async(run_chunk, ((name, records, paths),))
                inflight.append((name, res))
                while len(inflight) > 2 * engine.workers:
                    settle(*inflight.popleft())
            while inflight:
                settle(*inflight.popleft())
            t_a = t_b = time.time()
            for job in tokenizing:
                job.get()
    if bar is not None:
        bar.close()
    stats = decider.finish()
    t_a2 = time.time()
    docs = P.layout(cfg, work, parts, decisions)
    if cfg.pack.kind == "image":
        _check_image_shapes(docs, paths)
    kind, seq, S = cfg.pack.kind, cfg.pack.seq_len, cfg.pack.samples_per_shard
    vocab = vocab_size(tok_meta) if kind != "image" else 256
    dtype = dtype_for_vocab(vocab)
    builder = P.ShardBuilder(work, parts, docs, out, seq, S, dtype,
                             special_ids(tok_meta) if kind != "image" else {}, cfg.seed, cfg.pack.random_next_prob)
    jobs: List[P.ShardJob] = []
    for split in P.SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
        d = docs[split]
        if kind == "causal":
            jobs += P.causal_jobs(split, d, seq, S)
        elif kind == "bert":
            from dist_llm.data.prepare.bert import max_pairs

            est = np.minimum(max_pairs(d, seq), d["ntok"] // max(seq - 3, 1) + 1) if len(d["ntok"]) else d["ntok"]
            jobs += P.doc_jobs(split, d, S, est)
        else:
            jobs += P.doc_jobs(split, d, S, np.ones(len(d["ntok"]), np.int64))

    # Phase C
    marks = work / "done"
    marks.mkdir(exist_ok=True)
    entries: Dict[Tuple[str, int], Dict[str, Any]] = {}
    todo = []
    for j in jobs:
        mk = marks / f"{j.split}-{j.index:06d}.json"
        if mk.is_file():
            e = json.loads(mk.read_text())
            f = out / j.split / e["file"]
            if f.is_file() and sha256_file(f) == e["sha256"]:
                entries[(j.split, j.index)] = e
                continue
        todo.append((j, kind if kind != "image" else "images"))
    written = 0
    if hasattr(engine, "write_shards"):
        results = engine.write_shards(builder, kind if kind != "image" else "images", [j for j, _ in todo])
    else:
        results = engine.map_ordered_bounded(_init_builder, builder, _write_job, iter(todo))
    for job, entry in results:
        (marks / f"{job.split}-{job.index:06d}.json").write_text(json.dumps(entry, sort_keys=True))
        entries[(job.split, job.index)] = entry
        written += 1
        if stop_after and stop_after[0] == "shards" and written >= stop_after[1]:
            raise Interrupted(f"stopped after {written} shards")

    # Manifests: split manifests first, the dataset manifest last (its presence = complete).
    summary = stats.as_dict()
    result: Dict[str, Any] = {"format": DATASET_FORMAT, "fingerprint": fp, "config": config_dict(cfg),
                              "tokenizer": tok_meta, "stats": summary, "splits": {}}
    if kind != "image" and tok_meta["kind"] != "byte":
        result["tokenizer_sha256"] = sha256_file(out / "tokenizer.json")
    elif kind != "image":
        result["tokenizer_sha256"] = sha256_bytes(json.dumps(tok_meta, sort_keys=True).encode())
    for split in P.SPLITS:
        shards = [entries[(j.split, j.index)] for j in jobs if j.split == split]
        extra = {"split": split, "documents": stats.kept[split], "fingerprint": fp}
        if kind == "causal":
            m = token_manifest(seq, vocab, special_ids(tok_meta).get("eos"), shards, tok_meta, extra)
        else:
            n = sum(s["num_samples"] for s in shards)
            m = {"format": PAIRS_FORMAT if kind == "bert" else IMAGES_FORMAT, "num_samples": n, "shards": shards,
                 "extra": extra}
            if kind == "bert":
                m.update(seq_len=seq, sample_len=seq, dtype=dtype, vocab_size=vocab, tokenizer=tok_meta,
                         num_tokens=n * seq, special_ids=special_ids(tok_meta))
            else:
                shp = docs[split]["shape"]
                m.update(image_shape=[int(x) for x in shp[0]] if len(shp) else None, classes=classes,
                         dtype="uint8")
        write_manifest(out / split, m)
        result["splits"][split] = {k: m.get(k) for k in ("num_samples", "num_tokens")} | {
            "shards": len(shards), "documents": stats.kept[split]}
    # Local engine: dedup and tokenization overlap phase A; "tokenize" is the wait after it.
    result["seconds"] = {"process": round(t_a - t0, 3), "dedup": round(t_b - t_a, 3), "tokenize": round(t_a2 - t_b, 3),
                         "total": round(time.time() - t0, 3)}
    result["throughput_mb_s"] = round(stats.bytes / 1e6 / max(time.time() - t0, 1e-9), 3)
    text = json.dumps(result, sort_keys=True, indent=1) + "\n"
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, done)
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _check_image_shapes(docs: Dict[str, Dict[str, np.ndarray]], paths: Sequence[str]) -> None:
    shapes = np.concatenate([d["shape"] for d in docs.values() if len(d.get("shape", []))] or [np.zeros((0, 3))])
    if len(shapes) and (shapes != shapes[0]).any():
        i = int(np.nonzero((shapes != shapes[0]).any(axis=1))[0][0])
        raise P.BadInputError(f"images differ in size ({tuple(shapes[0])} vs {tuple(shapes[i])}); set "
                              f"pack.image_size=N to resize them all to NxN")


def _progress(cfg: PrepareConfig, total: int):
    on = cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="prepare", file=sys.stderr)


__all__ = ["run_prepare", "Interrupted", "LocalEngine", "DATASET_FORMAT", "output_fingerprint", "FORMAT"]
