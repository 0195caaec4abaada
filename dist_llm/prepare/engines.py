"""Where the parallel phases run: the interface every engine offers, and the local engine.

An engine runs three kinds of work, each a pure function of its inputs (so the output does
not depend on the engine): *process* (phase A: read, clean, filter, hash chunks into parts),
*tokenize* (phase A2: the documents dedup kept) and *write* (phase C: shards). Phase A and A2
share a :meth:`Engine.session` so an engine may overlap them (the local one tokenizes a part
as soon as it is decided, in the same pool); the driver (:mod:`.pipeline`) decides, in input
order, between the two. ``engine=ray`` is :class:`dist_llm.prepare.ray_engine.RayEngine`.
"""
from __future__ import annotations

import os
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, List, Optional, Protocol, Tuple

import numpy as np

from dist_llm.prepare.plan import ShardJob
from dist_llm.prepare.process import PartSource, WorkerContext, clean_chunk, init_worker, run_chunk, run_tokenize


class EngineSession(Protocol):
    def process(self, src: PartSource) -> Iterator[Tuple[str, Optional[Dict[str, Any]]]]:
        """Every part in input order, as soon as it and all before it exist: ``(name, counters)``;
        counters are None for a part that was already on disk."""

    def tokenize(self, name: str, keep: np.ndarray) -> None:
        """Queue phase A2 for a part (``keep``: indices of the candidates dedup kept)."""

    def finish(self) -> None:
        """Wait until every queued tokenization is written."""


class Engine(Protocol):
    workers: int

    def sample(self, ctx: WorkerContext, tasks: Iterator[Any]) -> Iterator[List[str]]:
        """Cleaned, filter-passing texts per chunk, in order (tokenizer training)."""

    def session(self, ctx: WorkerContext) -> ContextManager[EngineSession]:
        """Workers set up with ``ctx`` for phases A and A2."""

    def write(self, packer: Any, jobs: List[ShardJob]) -> Iterator[Tuple[ShardJob, Dict[str, Any]]]:
        """Build the shards ``jobs`` with ``packer``; ``(job, manifest entry)`` as they finish."""


def make_engine(kind: str, workers: int, ray_address: Optional[str]) -> Engine:
    if kind == "ray":
        from dist_llm.prepare.ray_engine import RayEngine

        return RayEngine(ray_address, workers)
    return LocalEngine(workers)


class LocalEngine:
    """``multiprocessing`` (spawn-safe 'fork' where available); ``workers=1`` runs inline."""

    def __init__(self, workers: int) -> None:
        self.workers = workers or os.cpu_count() or 1

    @contextmanager
    def _pool(self, init: Callable, arg: Any) -> Iterator[Any]:
        """A worker pool for one phase. On a normal end (every result read, or the reader
        stopped early) it is closed and joined: each worker takes its sentinel and exits.
        ``terminate()`` is kept for errors: it SIGTERMs workers, and one killed while holding the
        task queue's lock, or one that inherited a Python SIGTERM handler and so does not die,
        leaves ``join`` waiting forever (seen: a prepare run hung in ``Pool._terminate_pool``)."""
        import multiprocessing as mp

        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(self.workers, initializer=_start_worker, initargs=(init, arg))
        failed = False
        try:
            yield pool
        except GeneratorExit:  # the consumer stopped reading: in-flight tasks (at most 2 x workers) finish
            raise
        except BaseException:
            failed = True
            raise
        finally:
            if failed:
                pool.terminate()
            else:
                pool.close()
                pool.join()

    def map_ordered_bounded(self, init: Callable, arg: Any, fn: Callable, tasks: Iterable[Any]) -> Iterator[Any]:
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

    def sample(self, ctx: WorkerContext, tasks: Iterator[Any]) -> Iterator[List[str]]:
        return self.map_ordered_bounded(init_worker, ctx, clean_chunk, tasks)

    @contextmanager
    def session(self, ctx: WorkerContext) -> Iterator["_LocalSession"]:
        if self.workers == 1:
            init_worker(ctx)
            yield _LocalSession(_Inline(), self.workers)
            return
        with self._pool(init_worker, ctx) as pool:
            yield _LocalSession(pool, self.workers)

    def write(self, packer: Any, jobs: List[ShardJob]) -> Iterator[Tuple[ShardJob, Dict[str, Any]]]:
        return self.map_ordered_bounded(_init_packer, packer, _write_job, iter(jobs))


def _start_worker(init: Callable, arg: Any) -> None:
    """A pool worker's start: the default SIGTERM action (a forked worker inherits the driver's
    Python handlers, e.g. a launcher's or Ray's, and would not die on ``terminate()``), then the
    phase's own initializer."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    init(arg)


class _LocalSession:
    """One pool does both kinds of task: a part's tokenization is queued as soon as it is
    decided, behind the chunks in flight."""

    def __init__(self, pool: Any, workers: int) -> None:
        self.pool, self.workers = pool, workers
        self.tokenizing: List[Any] = []

    def process(self, src: PartSource) -> Iterator[Tuple[str, Optional[Dict[str, Any]]]]:
        paths = src.paths
        inflight: deque = deque()
        for name, records in src.chunks(skip_done=True):
            res = None if records is None else self.pool.apply_async(run_chunk, ((name, records, paths),))
            inflight.append((name, res))
            while len(inflight) > 2 * self.workers:
                yield _settled(*inflight.popleft())
        while inflight:
            yield _settled(*inflight.popleft())

    def tokenize(self, name: str, keep: np.ndarray) -> None:
        self.tokenizing.append(self.pool.apply_async(run_tokenize, ((name, keep),)))

    def finish(self) -> None:
        for job in self.tokenizing:
            job.get()
        self.tokenizing = []


def _settled(name: str, res: Any) -> Tuple[str, Optional[Dict[str, Any]]]:
    return name, None if res is None else res.get()


class _Lazy:
    def __init__(self, fn: Callable, args: tuple) -> None:
        self.fn, self.args = fn, args

    def get(self) -> Any:
        return self.fn(*self.args)


class _Inline:
    """``workers=1``: tasks run in this process, when their result is asked for (in order)."""

    def apply_async(self, fn: Callable, args: tuple) -> _Lazy:
        return _Lazy(fn, args)


_PACKER: Optional[Any] = None


def _init_packer(packer: Any) -> None:
    global _PACKER
    _PACKER = packer


def _write_job(job: ShardJob) -> Tuple[ShardJob, Dict[str, Any]]:
    assert _PACKER is not None, "_init_packer was not called in this process"
    return job, _PACKER.write(job)


__all__ = ["Engine", "EngineSession", "LocalEngine", "make_engine"]
