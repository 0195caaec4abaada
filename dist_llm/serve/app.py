"""The OpenAI-compatible HTTP API: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/health``.

:func:`create_app` builds the FastAPI app; its lifespan loads the model (unless one is given)
and starts the batching worker, so the very same app runs under uvicorn (``dist-llm serve``)
and in every Ray Serve replica (``--ray``). Every error is answered in OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``) with a 4xx/5xx status, and never takes
the server down. Streaming answers are server-sent events in OpenAI's chunk format, ending with
``data: [DONE]``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, List, Optional, Tuple, Union

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dist_llm.config.serve_schema import ServeConfig
from dist_llm.serve.model_loader import LoadedModel, load_for_serving
from dist_llm.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, error_body, new_id, now,
                                     usage)
from dist_llm.serve.scheduler import BatchScheduler, QueueFullError
from dist_llm.serve.text import TextAssembler, render_chat

log = logging.getLogger("dist_llm.serve")
_DONE = object()  # end-of-stream marker on a request's token queue


def make_batch_runner(lm: LoadedModel):
    """The scheduler's ``run_batch``: one ``generate_batch`` call with the KV cache."""
    import torch

    def run(prompts, params, on_token):
        from dist_llm.models.generate import generate_batch

        with torch.inference_mode():
            return generate_batch(lm.model, prompts, params, pad_id=lm.pad_id, use_cache=True,
                                  decode=lm.tokenizer.decode, on_token=on_token)
    return run


@dataclass
class Job:
    """One prompt, checked and tokenized, ready for the scheduler."""

    ids: List[int]
    params: Any  # SamplingParams
    stops: Tuple[str, ...]


@dataclass
class ServerState:
    cfg: ServeConfig
    lm: LoadedModel
    scheduler: BatchScheduler

    def plan(self, req: Union[CompletionRequest, ChatCompletionRequest], prompts: List[Union[str, List[int]]],
             extra_stops: Tuple[str, ...] = ()) -> List[Job]:
        """Validate a request against the model and the limits; tokenize its prompts."""
        from dist_llm.models.generate import SamplingParams

        if req.model != self.lm.name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{self.lm.name}' "
                                f"(GET /v1/models)", param="model", code="model_not_found")
        if req.n != 1:
            raise APIError(400, f"n={req.n} is not supported: only n=1 (send the request again for more "
                                f"samples)", param="n")
        if not prompts:
            raise APIError(400, "the prompt is empty", param="prompt")
        if req.stream and len(prompts) > 1:
            raise APIError(400, "streaming takes a single prompt; send one request per prompt", param="prompt")
        max_new = getattr(req, "max_completion_tokens", None) or req.max_tokens or self.cfg.default_max_tokens
        if max_new > self.cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_new} is above this server's limit of {self.cfg.max_tokens_limit}",
                           param="max_tokens")
        stops = tuple(req.stop_list()) + extra_stops
        params = SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_k=req.top_k,
                                top_p=req.top_p, seed=req.seed, stop_token_ids=self.lm.stop_token_ids,
                                stop_strings=stops)
        return [Job(self._tokenize(p, max_new), params, stops) for p in prompts]

    def _tokenize(self, prompt: Union[str, List[int]], max_new: int) -> List[int]:
        ids = self.lm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty (no tokens)", param="prompt")
        if any(not 0 <= i < self.lm.vocab_size for i in ids):
            raise APIError(400, f"prompt token ids must be in [0, {self.lm.vocab_size})", param="prompt")
        limit = self.cfg.max_prompt_tokens or self.lm.max_seq_len
        if len(ids) > limit:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {limit}",
                           param="prompt", code="context_length_exceeded")
        if len(ids) + max_new > self.lm.max_seq_len:
            raise APIError(400, f"This model's maximum context length is {self.lm.max_seq_len} tokens. However, "
                                f"you requested {len(ids) + max_new} tokens ({len(ids)} in the prompt, {max_new} "
                                f"for the completion). Shorten the prompt or reduce max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        return ids

    def submit(self, job: Job, on_token=None):
        try:
            return self.scheduler.submit(job.ids, job.params, on_token)
        except QueueFullError as e:
            raise APIError(503, str(e), type_="server_error", code="queue_full") from None

    async def complete(self, job: Job) -> Tuple[str, str, int]:
        """(text, finish_reason, completion tokens) of one non-streamed prompt."""
        fut = self.submit(job)
        try:
            res = await asyncio.wait_for(asyncio.wrap_future(fut), self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            fut.cancel()
            raise APIError(504, f"the request was not answered within {self.cfg.request_timeout_s}s "
                                f"(serve.request_timeout_s)", type_="server_error", code="timeout") from None
        asm = TextAssembler(self.lm.tokenizer.decode, job.stops)
        _, text, hit = asm.finish(res.token_ids, getattr(res, "text", None))
        return text, "stop" if hit else res.finish_reason, len(res.token_ids)

    async def stream(self, job: Job) -> Tuple[Any, "asyncio.Queue[Any]"]:
        """Submit a streamed prompt; its tokens (then ``_DONE``) arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        q: "asyncio.Queue[Any]" = asyncio.Queue()
        fut = self.submit(job, on_token=lambda tok: loop.call_soon_threadsafe(q.put_nowait, tok))
        fut.add_done_callback(lambda _f: loop.call_soon_threadsafe(q.put_nowait, _DONE))
        return fut, q


async def stream_deltas(state: ServerState, job: Job, fut, q) -> AsyncIterator[Tuple[str, Optional[str], int]]:
    """Yield (text delta, finish_reason or None, completion tokens so far); the last has a reason.
    Raises APIError on timeout or a failed generation (the caller turns it into an error event)."""
    asm = TextAssembler(state.lm.tokenizer.decode, job.stops)
    deadline = asyncio.get_running_loop().time() + state.cfg.request_timeout_s
    try:
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                item = await asyncio.wait_for(q.get(), max(left, 0.0))
            except asyncio.TimeoutError:
                raise APIError(504, f"generation did not finish within {state.cfg.request_timeout_s}s",
                               type_="server_error", code="timeout") from None
            if item is _DONE:
                break
            delta = asm.push(item)
            if delta:
                yield delta, None, len(asm.ids)
        if fut.cancelled() or fut.exception() is not None:
            raise APIError(500, f"generation failed: {fut.exception() if not fut.cancelled() else 'cancelled'}",
                           type_="server_error")
        res = fut.result()
        delta, _, hit = asm.finish(res.token_ids, getattr(res, "text", None))
        yield delta, "stop" if hit else res.finish_reason, len(res.token_ids)
    finally:
        fut.cancel()  # no effect once running; frees the slot if the client left before its batch


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _stream_response(state: ServerState, job: Job, include_usage: bool, chunk) -> StreamingResponse:
    """``chunk(delta, finish_reason, first)`` builds one OpenAI chunk dict. The request is queued
    before the response starts, so a full queue is still a plain 503."""
    fut, q = await state.stream(job)

    async def events() -> AsyncIterator[str]:
        n_tokens, first = 0, True
        try:
            async for delta, reason, n_tokens in stream_deltas(state, job, fut, q):
                if delta or reason is not None or first:
                    yield sse(chunk(delta, reason, first))
                    first = False
            if include_usage:
                yield sse({**chunk("", None, False), "choices": [], "usage": usage(len(job.ids), n_tokens)})
        except APIError as e:
            yield sse(e.body())
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _state(request: Request) -> ServerState:
    return request.app.state.server


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_req: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, e: RequestValidationError):
        errs = e.errors()
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}" for err in errs]
        param = next((str(err["loc"][1]) for err in errs if len(err.get("loc", ())) > 1), None)
        return JSONResponse(error_body("invalid request: " + "; ".join(parts), param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(_req: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)


router = APIRouter()


@router.get("/health")
async def health(request: Request):
    st = _state(request)
    s = st.scheduler.stats
    body = {"status": "ok" if st.scheduler.alive else "worker stopped", "model": st.lm.name,
            "queued": st.scheduler.queued(), "batches": s.batches, "requests": s.requests,
            "max_batch_seen": s.max_batch_seen, "pid": os.getpid()}  # pid: which replica answered
    return JSONResponse(body, status_code=200 if st.scheduler.alive else 503)


@router.get("/v1/models")
async def models(request: Request):
    lm = _state(request).lm
    return {"object": "list", "data": [{"id": lm.name, "object": "model", "created": now(),
                                        "owned_by": "dist-llm", "max_model_len": lm.max_seq_len}]}


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    st = _state(request)
    jobs = st.plan(body, body.prompts())
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": st.lm.name}
    if body.stream:
        def chunk(delta, reason, _first):
            return {**head, "choices": [{"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}]}
        return await _stream_response(st, jobs[0], _include_usage(body), chunk)
    outs = await asyncio.gather(*(st.complete(j) for j in jobs))
    choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
               for i, (text, reason, _) in enumerate(outs)]
    return {**head, "choices": choices, "usage": usage(sum(len(j.ids) for j in jobs), sum(n for _, _, n in outs))}


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, request: Request):
    st = _state(request)
    prompt, extra_stops = render_chat(st.lm.tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
    (job,) = st.plan(body, [prompt], extra_stops)
    head = {"id": new_id("chatcmpl"), "created": now(), "model": st.lm.name}
    if body.stream:
        def chunk(delta, reason, first):
            d = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta else {})
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}]}
        return await _stream_response(st, job, _include_usage(body), chunk)
    text, reason, n = await st.complete(job)
    return {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason}],
            "usage": usage(len(job.ids), n)}


def create_app(cfg: ServeConfig, loaded: Optional[LoadedModel] = None) -> FastAPI:
    """The API for ``cfg``; pass ``loaded`` to serve a model already in memory (tests, bench)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        lm = loaded if loaded is not None else await asyncio.to_thread(load_for_serving, cfg)
        sched = BatchScheduler(make_batch_runner(lm), cfg.max_batch_size, cfg.batch_timeout_ms, cfg.max_queue)
        app.state.server = ServerState(cfg, lm, sched.start())
        log.info("serving %s (%s) with batches of up to %d", lm.name, lm.source, cfg.max_batch_size)
        try:
            yield
        finally:
            sched.stop()

    app = FastAPI(title="dist-llm", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(router)
    return app
