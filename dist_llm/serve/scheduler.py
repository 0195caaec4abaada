"""Dynamic batching: concurrent requests share one ``generate_batch`` call on the model.

Requests enter a bounded queue (full -> :class:`QueueFullError`, which the app answers with 503).
One worker thread owns the model: it blocks for the first request, then keeps collecting until
``max_batch_size`` requests are in hand or ``batch_timeout_ms`` has passed since the first one
arrived, runs them as one batch and resolves each request's ``concurrent.futures.Future``.
Streaming requests also pass ``on_token``, called from the worker thread for every new token
(the app forwards it to its event loop with ``call_soon_threadsafe``).

A request whose caller gave up (timeout, client gone) cancels its future; the worker skips it if
its batch has not started yet. A failing batch fails only its own requests; the worker lives on.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

log = logging.getLogger("dist_llm.serve")

# run_batch(prompts, params per prompt, on_token(row, token_id)) -> one result per prompt
BatchRunner = Callable[[List[List[int]], List[Any], Optional[Callable[[int, int], None]]], List[Any]]


class QueueFullError(RuntimeError):
    pass


@dataclass(eq=False)
class GenerationRequest:
    prompt_ids: List[int]
    params: Any
    on_token: Optional[Callable[[int], None]] = None
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass
class SchedulerStats:
    batches: int = 0
    requests: int = 0
    max_batch_seen: int = 0
    batch_sizes: Dict[int, int] = field(default_factory=dict)  # size -> how many batches had it

    def record(self, size: int) -> None:
        self.batches += 1
        self.requests += size
        self.max_batch_seen = max(self.max_batch_seen, size)
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1


class RequestQueue:
    """A bounded FIFO whose slots held by cancelled requests are reclaimed when it is full (a
    caller that timed out must not keep blocking newcomers while the worker is busy)."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._items: "deque[GenerationRequest]" = deque()
        self._cv = threading.Condition()

    def put(self, req: GenerationRequest) -> None:
        with self._cv:
            if len(self._items) >= self.maxsize:
                self._items = deque(r for r in self._items if not r.future.cancelled())
            if len(self._items) >= self.maxsize:
                raise QueueFullError(f"the request queue is full ({self.maxsize} waiting); retry later")
            self._items.append(req)
            self._cv.notify()

    def get(self, timeout: float) -> Optional[GenerationRequest]:
        with self._cv:
            if not self._items and timeout > 0:
                self._cv.wait_for(lambda: bool(self._items), timeout)
            return self._items.popleft() if self._items else None

    def live(self) -> int:
        with self._cv:
            return sum(not r.future.cancelled() for r in self._items)


class BatchScheduler:
    def __init__(self, run_batch: BatchRunner, max_batch_size: int, batch_timeout_ms: float, max_queue: int):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("BatchScheduler: max_batch_size and max_queue must be >= 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.batch_timeout_s = batch_timeout_ms / 1000.0
        self._queue = RequestQueue(max_queue)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.stats = SchedulerStats()

    # --- lifecycle ---
    def start(self) -> "BatchScheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dist-llm-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while (req := self._queue.get(0)) is not None:  # whoever still waits gets an answer, not a hang
            if req.future.set_running_or_notify_cancel():
                req.future.set_exception(RuntimeError("the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queued(self) -> int:
        """Requests waiting for a batch (cancelled ones not counted)."""
        return self._queue.live()

    # --- producer side (any thread) ---
    def submit(self, prompt_ids: List[int], params: Any,
               on_token: Optional[Callable[[int], None]] = None) -> Future:
        if self._stop.is_set():
            raise RuntimeError("the scheduler is stopped")
        req = GenerationRequest(list(prompt_ids), params, on_token)
        self._queue.put(req)  # raises QueueFullError
        return req.future

    # --- worker side ---
    def _collect(self) -> List[GenerationRequest]:
        """Block for a first request, then gather more until the batch is full or its window closes."""
        first = self._queue.get(timeout=0.1)
        if first is None:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_timeout_s
        while len(batch) < self.max_batch_size:
            nxt = self._queue.get(timeout=deadline - time.monotonic())
            if nxt is None:
                break
            batch.append(nxt)
        # skip requests whose caller already gave up; mark the rest running (no cancel from now on)
        return [r for r in batch if r.future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if batch:
                self._run(batch)

    def _run(self, batch: List[GenerationRequest]) -> None:
        streams = [r.on_token for r in batch]

        def on_token(row: int, token_id: int) -> None:
            cb = streams[row]
            if cb is not None:
                cb(int(token_id))

        self.stats.record(len(batch))
        try:
            results = self._run_batch([r.prompt_ids for r in batch], [r.params for r in batch],
                                      on_token if any(streams) else None)
            if len(results) != len(batch):
                raise RuntimeError(f"generate_batch returned {len(results)} results for {len(batch)} prompts")
        except BaseException as e:  # noqa: BLE001 - the worker must survive any failure of one batch
            log.exception("batch of %d requests failed", len(batch))
            for r in batch:
                r.future.set_exception(e)
            return
        for r, res in zip(batch, results):
            r.future.set_result(res)
