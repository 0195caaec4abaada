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
(~16 bytes per key) and the plan (~40 bytes per kept document) grow with the corpus, and past
``memory_budget_mb`` both spill to files under ``.work`` (sorted key runs, memory-mapped plan
columns) without changing the output.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from dist_llm.config.prepare_schema import PrepareConfig, validate_prepare
from dist_llm.data.shards import MANIFEST, sha256_bytes, sha256_file, write_manifest
from dist_llm.prepare.debug import Interrupted, PrepareHooks, hooks_for
from dist_llm.prepare.engines import Engine, LocalEngine, make_engine
from dist_llm.prepare.packers import Packer, packer_class
from dist_llm.prepare.plan import SPLITS, Decider, Decision, ShardJob, ShardSource, Stats, layout
from dist_llm.prepare.process import PartSource, WorkerContext, part_tokenized
from dist_llm.prepare.readers import InputFile, discover, image_classes, plan_units, stdlib_files

DATASET_FORMAT = "dist-llm-dataset/1"
_WORK_FORMAT = "parts/2"  # the layout of .work/parts (text, then tokens after dedup); older work is discarded
# Fields that do not change the output: not part of its fingerprint.
_RUNTIME_ONLY = ("output_dir", "engine", "workers", "ray_address", "progress", "keep_work", "memory_budget_mb")


def config_dict(cfg: PrepareConfig) -> Dict[str, Any]:
    """The config as stored in the manifest; without ``debug`` (test-only fault injection)."""
    from dist_llm.config.store import config_to_dict

    d = config_to_dict(cfg)
    d.pop("debug", None)
    d.pop("destination", None)  # where a copy goes (a command may hold credentials): not the output
    return d


def output_fingerprint(cfg: PrepareConfig) -> str:
    """Hash of the fields that change the output (not engine, workers, progress...)."""
    d = {k: v for k, v in config_dict(cfg).items() if k not in _RUNTIME_ONLY}
    return sha256_bytes(json.dumps(d, sort_keys=True).encode())[:16]


def resolve_inputs(cfg: PrepareConfig, work: Path) -> Tuple[List[InputFile], List[str], Optional[str]]:
    """Input files, class names (images) and the labels file (npy); embedded sources materialised."""
    inp = cfg.input
    if inp.embedded == "stdlib":
        return stdlib_files(inp.embedded_max_bytes), [], None
    if inp.embedded == "stdlib_classify":
        from dist_llm.prepare.labelled import write_stdlib_classify

        path = write_stdlib_classify(work / "stdlib-classify.jsonl", seed=cfg.seed)
        return [InputFile(str(path), "jsonl", size=path.stat().st_size)], [], None
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
        classes = image_classes(inp.paths)
    return files, classes, inp.npy_labels


def run_prepare(cfg: PrepareConfig, engine: Optional[Engine] = None) -> Dict[str, Any]:
    """Prepare ``cfg.output_dir``; returns the dataset manifest (also ``<output_dir>/manifest.json``).

    ``engine`` defaults to the one ``cfg.engine`` names. ``cfg.debug`` may ask for a simulated
    crash (:class:`~dist_llm.prepare.debug.Interrupted`), see :mod:`dist_llm.prepare.debug`.
    """
    validate_prepare(cfg)
    t0 = time.time()
    out = Path(cfg.output_dir)
    work = out / ".work"
    fp = output_fingerprint(cfg)
    finished = _finished(out, fp)
    if finished is not None:
        _publish(cfg, out)
        return finished
    _start_work(work, fp)
    engine = engine or make_engine(cfg.engine, cfg.workers, cfg.ray_address)
    hooks = hooks_for(cfg.debug)
    packer_cls = packer_class(cfg.pack.kind)

    files, classes, labels = resolve_inputs(cfg, work)
    inp = cfg.input
    src = PartSource(files, plan_units(files, inp.chunk_records, inp.chunk_bytes), labels, inp.chunk_records,
                     inp.chunk_bytes, inp.text_field, work)
    ctx = WorkerContext(cfg=cfg, work_dir=str(work), tokenizer_meta=None, tokenizer_dir=str(out))
    tok_meta = packer_cls.vocabulary(cfg, out, work, _sampler(engine, ctx, src), classes)
    if packer_cls.tokenizes:
        ctx = WorkerContext(cfg=cfg, work_dir=str(work), tokenizer_meta=tok_meta, tokenizer_dir=str(out))

    parts, decisions, stats, secs = _process(cfg, engine, ctx, src, packer_cls.tokenizes, hooks)
    t_plan = time.time()
    packer = packer_cls(cfg, tok_meta, classes, ShardSource(work, parts, layout(cfg, work, parts, decisions), out))
    jobs = [j for split in SPLITS for j in packer.jobs(split)]
    entries = _write_shards(engine, packer, jobs, work, out, hooks)

    result: Dict[str, Any] = {"format": DATASET_FORMAT, "fingerprint": fp, "config": config_dict(cfg),
                              "tokenizer": tok_meta, "stats": stats.as_dict(), "splits": {}}
    result.update(packer.dataset_fields())
    # Split manifests first, the dataset manifest last (its presence = complete).
    for split in SPLITS:
        shards = [entries[(j.split, j.index)] for j in jobs if j.split == split]
        m = packer.manifest(split, shards, {"split": split, "documents": stats.kept[split], "fingerprint": fp})
        write_manifest(out / split, m)
        result["splits"][split] = {k: m.get(k) for k in ("num_samples", "num_tokens")} | {
            "shards": len(shards), "documents": stats.kept[split]}
    # process: phase A (with the local engine, tokenization overlaps it); dedup: the ordered
    # decisions (phase B, on the driver); tokenize: the wait for phase A2 after phase A.
    result["seconds"] = {"process": round(secs["process"] - secs["dedup"] - t0, 3), "dedup": round(secs["dedup"], 3),
                         "tokenize": round(t_plan - secs["process"], 3), "total": round(time.time() - t0, 3)}
    result["throughput_mb_s"] = round(stats.bytes / 1e6 / max(time.time() - t0, 1e-9), 3)
    text = json.dumps(result, sort_keys=True, indent=1) + "\n"
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out / MANIFEST)
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    _publish(cfg, out)
    return result


def _publish(cfg: PrepareConfig, out: Path) -> None:
    """``destination``: copy the finished output there (dist_llm/prepare/publish.py)."""
    if cfg.destination:
        from dist_llm.prepare.publish import publish

        publish(out, cfg.destination, list(SPLITS))


def _finished(out: Path, fp: str) -> Optional[Dict[str, Any]]:
    """The manifest of a complete run of this config (``skipped``); else clear any stale one."""
    done = out / MANIFEST
    if done.is_file():
        m = json.loads(done.read_text())
        if m.get("fingerprint") == fp and all((out / s / MANIFEST).is_file() for s in SPLITS):
            return {**m, "skipped": True}
        done.unlink()
    for s in SPLITS:  # a rebuild must not leave a stale, complete-looking split
        (out / s / MANIFEST).unlink(missing_ok=True)
    return None


def _start_work(work: Path, fp: str) -> None:
    """Keep ``.work`` of an unfinished run of this config (resume); discard another config's."""
    stamp = work / "fingerprint"
    work_id = f"{fp} {_WORK_FORMAT}"
    if stamp.is_file() and stamp.read_text() != work_id:
        shutil.rmtree(work)  # an unfinished run of another config: its parts are useless
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(work_id)


def _sampler(engine: Engine, ctx: WorkerContext, src: PartSource) -> Callable[[int], Iterator[str]]:
    """``sample(max_bytes)``: the first cleaned, filter-passing texts (tokenizer training)."""
    def sample(max_bytes: int) -> Iterator[str]:
        got = 0
        tasks = ((name, records, src.paths) for name, records in src.chunks(skip_done=False))
        for texts in engine.sample(ctx, tasks):
            for t in texts:
                yield t
                got += len(t.encode("utf-8"))
                if got >= max_bytes:
                    return
    return sample


def _process(cfg: PrepareConfig, engine: Engine, ctx: WorkerContext, src: PartSource, tokenizes: bool,
             hooks: PrepareHooks) -> Tuple[List[str], List[Decision], Stats, Dict[str, float]]:
    """Phase A, B's decisions in input order as parts complete, and A2 (what dedup keeps).

    Returns the parts, their decisions, the stats and when phase A ended / how long deciding took.
    """
    bar = _progress(cfg, sum(f.size for f in src.files))
    decider = Decider(cfg, src.work)
    parts: List[str] = []
    decisions: List[Decision] = []
    new_parts, t_dedup = 0, 0.0
    with engine.session(ctx) as session:
        for name, counters in session.process(src):
            if counters is not None:
                new_parts += 1
                if bar is not None:
                    bar.update(counters["bytes"])
                    bar.set_postfix(docs=counters["records"], refresh=False)
                hooks.after_part(new_parts)
            t = time.time()
            d = decider.add(name)
            t_dedup += time.time() - t
            parts.append(name)
            decisions.append(d)
            if tokenizes and not part_tokenized(src.work, name):
                session.tokenize(name, d.keep)
        t_process = time.time()
        session.finish()
    if bar is not None:
        bar.close()
    return parts, decisions, decider.finish(), {"process": t_process, "dedup": t_dedup}


def _write_shards(engine: Engine, packer: Packer, jobs: List[ShardJob], work: Path, out: Path,
                  hooks: PrepareHooks) -> Dict[Tuple[str, int], Dict[str, Any]]:
    """Phase C: every shard not already written and verified (a done-marker with its sha256)."""
    marks = work / "done"
    marks.mkdir(exist_ok=True)
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
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
        todo.append(j)
    for written, (job, entry) in enumerate(engine.write(packer, todo), 1):
        (marks / f"{job.split}-{job.index:06d}.json").write_text(json.dumps(entry, sort_keys=True))
        entries[(job.split, job.index)] = entry
        hooks.after_shard(written)
    return entries


def _progress(cfg: PrepareConfig, total: int):
    on = cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="prepare", file=sys.stderr)


__all__ = ["run_prepare", "Interrupted", "LocalEngine", "DATASET_FORMAT", "output_fingerprint", "resolve_inputs"]
