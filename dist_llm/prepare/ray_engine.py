"""``engine=ray``: phases A and C of the pipeline as Ray Data jobs across a cluster.

Phase A: a dataset of *units* (see readers.plan_units); an actor pool reads each unit itself
(so reading is parallel across nodes, not funnelled through the driver), cleans, filters,
hashes and writes its parts. Phase A2: a dataset of parts; actors tokenize the documents that
dedup kept. Phase C: a dataset of shard jobs; actors build and write shards. Phase B (ordered
dedup over metadata) stays on the driver. Parts and shards are named by
position, so the output equals the local engine's byte for byte.

Assumes ``output_dir`` is on storage every node can read and write (NFS, Lustre, a mounted
bucket); on a single machine any path works. Ray is imported only when this engine is used.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from dist_llm.launch.ray_connect import init_ray


class _UnitProcessor:
    """Ray Data actor: reads units and writes their parts (skipping parts already on disk)."""

    def __init__(self, ctx: Any, src: Any) -> None:
        from dist_llm.prepare import process

        process.init_worker(ctx)
        self.src, self.paths = src, src.paths

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, List[Any]]:
        from dist_llm.prepare.process import part_done, run_chunk

        out: Dict[str, List[Any]] = {"unit": [], "parts": [], "bytes": []}
        for u in batch["unit"].tolist():
            n, size = 0, 0
            for name, records in self.src.unit_chunks(u):
                if not part_done(self.src.work, name):
                    size += run_chunk((name, records, self.paths))["bytes"]
                    n += 1
            out["unit"].append(u)
            out["parts"].append(n)
            out["bytes"].append(size)
        return out


class _PartTokenizer:
    """Ray Data actor: tokenizes the kept documents of parts (phase A2)."""

    def __init__(self, ctx: Any) -> None:
        from dist_llm.prepare import process

        process.init_worker(ctx)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, List[Any]]:
        from dist_llm.prepare.process import run_tokenize

        names = [str(n) for n in batch["name"]]
        for name, keep in zip(names, batch["keep"]):
            run_tokenize((name, np.asarray(keep, dtype=np.int64)))
        return {"name": names}


class _ShardWriterActor:
    def __init__(self, packer: Any) -> None:
        self.packer = packer

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, List[Any]]:
        import json

        from dist_llm.prepare.plan import ShardJob

        entries = []
        for split, idx, lo, hi in zip(batch["split"].tolist(), batch["index"].tolist(), batch["lo"].tolist(),
                                      batch["hi"].tolist()):
            entries.append(json.dumps(self.packer.write(ShardJob(split, idx, lo, hi))))
        return {"split": list(batch["split"]), "index": list(batch["index"]), "entry": entries}


class RayEngine:
    """The :class:`dist_llm.prepare.engines.Engine` interface on Ray Data."""

    def __init__(self, address: Optional[str], workers: int) -> None:
        kwargs: Dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:  # a local Ray: its workers import this same checkout
            root = str(Path(__file__).resolve().parents[2])
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
        ray = init_ray(address, "prepare.ray_address", **kwargs)
        self.ray = ray
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or cpus
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False

    def sample(self, ctx: Any, tasks: Iterator[Any]) -> Iterator[List[str]]:
        """Driver-side (tokenizer training sample): small, sequential."""
        from dist_llm.prepare import process

        process.init_worker(ctx)
        for t in tasks:
            yield process.clean_chunk(t)

    @contextmanager
    def session(self, ctx: Any) -> Iterator["_RaySession"]:
        yield _RaySession(self, ctx)

    def process_units(self, ctx: Any, src: Any) -> int:
        units = src.units
        ds = self.ray.data.from_items([{"unit": u} for u in range(len(units))], override_num_blocks=max(1, len(units)))
        ds = ds.map_batches(_UnitProcessor, batch_size=1, concurrency=min(self.workers, max(1, len(units))),
                            fn_constructor_args=(ctx, src), num_cpus=1)
        return sum(int(r["parts"]) for r in ds.iter_rows())

    def tokenize_parts(self, ctx: Any, tasks: Sequence[tuple]) -> None:
        if not tasks:
            return
        items = [{"name": name, "keep": [int(k) for k in keep]} for name, keep in tasks]
        ds = self.ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        ds = ds.map_batches(_PartTokenizer, batch_size=1, concurrency=min(self.workers, len(items)),
                            fn_constructor_args=(ctx,), num_cpus=1)
        for _ in ds.iter_rows():
            pass

    def write(self, packer: Any, jobs: Sequence[Any]) -> Iterator[tuple]:
        import json

        from dist_llm.prepare.plan import ShardJob

        if not jobs:
            return
        items = [{"split": j.split, "index": j.index, "lo": j.lo, "hi": j.hi} for j in jobs]
        ds = self.ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        ds = ds.map_batches(_ShardWriterActor, batch_size=1, concurrency=min(self.workers, len(items)),
                            fn_constructor_args=(packer,), num_cpus=1)
        by_key = {(j.split, j.index): j for j in jobs}
        for r in ds.iter_rows():
            job = by_key[(str(r["split"]), int(r["index"]))]
            yield ShardJob(job.split, job.index, job.lo, job.hi), json.loads(r["entry"])


class _RaySession:
    """Phase A as one Ray Data job over the units, then (after the driver decided every part)
    phase A2 as another: Ray gains nothing from interleaving them."""

    def __init__(self, engine: RayEngine, ctx: Any) -> None:
        self.engine, self.ctx = engine, ctx
        self.tasks: List[tuple] = []

    def process(self, src: Any) -> Iterator[Tuple[str, Optional[Dict[str, Any]]]]:
        self.engine.process_units(self.ctx, src)
        for p in sorted((src.work / "parts").glob("*.meta.npz")):
            yield p.name[: -len(".meta.npz")], None

    def tokenize(self, name: str, keep: np.ndarray) -> None:
        self.tasks.append((name, keep))

    def finish(self) -> None:
        self.engine.tokenize_parts(self.ctx, self.tasks)
        self.tasks = []
