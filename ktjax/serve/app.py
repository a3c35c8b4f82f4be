"""The FastAPI app: OpenAI's routes over a Scheduler.

Each request is submitted to the scheduler with a callback that carries its events from the scheduler's
thread into the event loop (call_soon_threadsafe into an asyncio.Queue); a client that goes away is cancelled.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ktjax.errors import KtjaxError
from ktjax.serve.metrics import ServerMetrics
from ktjax.serve.protocol import ApiError, ChatRequest, CompletionRequest, error_body, parse_request
from ktjax.serve.scheduler import Finished, PromptTooLong, QueueFull, RequestParams, ShuttingDown, TokenEvent
from ktjax.serve.textstream import TextStream

MAX_BODY_BYTES = 4 << 20
BODY_TIMEOUT_S = 60.0  # for the whole body (python -m ktjax.serve --body-timeout): a trickling client gets 408
log = logging.getLogger("ktjax.serve")


def create_app(engine, scheduler, *, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT_S) -> FastAPI:
    """The app for one engine and its (started) scheduler; app.state.draining = True makes it refuse new work
    (503) while running requests finish."""
    server = Server(engine, scheduler, model_name, max_body_bytes, body_timeout)
    app = FastAPI(title="ktjax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.draining = False
    app.state.server = server
    app.add_middleware(Gate, api_key=api_key, state=app.state, metrics=server.metrics)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on "
                                                             f"{request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(e.status_code, message), e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):  # one failed request, never a dead server
        log.exception("internal error")
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}"), 500)

    app.post("/v1/chat/completions")(server.chat)
    app.post("/v1/completions")(server.completions)
    app.get("/v1/models")(server.models)
    app.get("/v1/models/{model:path}")(server.model)
    app.get("/health")(server.health)
    app.get("/metrics")(server.metrics_page)
    app.get("/dashboard")(server.dashboard)
    app.get("/dashboard/data")(server.dashboard_data)
    return app


class Gate:
    """ASGI middleware in front of every route: one Authorization header (two could be read differently by a
    proxy in front and by us: 400), the API key (except on /health, which a load balancer checks without it, and
    /dashboard, a page without data that a browser opens without headers: its data needs the key), then refusal
    while draining. It counts every response by status code."""

    OPEN_PATHS = ("/health", "/dashboard")

    def __init__(self, app, api_key: str | None, state, metrics):
        self.app, self.state, self.metrics = app, state, metrics
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.responded(status)
            await send(message)

        given = [value for name, value in scope["headers"] if name == b"authorization"]
        refusal = self._refusal(given[0] if given else b"", scope["path"]) if len(given) <= 1 else JSONResponse(
            error_body(400, f"{len(given)} Authorization headers: send one", None, "invalid_request"), 400)
        try:
            await (self.app if refusal is None else refusal)(scope, receive, counted_send)
        except Exception:
            if status is None:  # the outer error handler answers 500
                self.metrics.responded(500)
            raise

    def _refusal(self, authorization: bytes, path: str):
        if self.expected is not None and path not in self.OPEN_PATHS and \
                not hmac.compare_digest(authorization, self.expected):
            message = "missing API key" if not authorization else "wrong API key"
            return JSONResponse(error_body(401, f"{message}: send Authorization: Bearer <key>", None,
                                           "invalid_api_key"), 401)
        if self.state.draining:
            return JSONResponse(error_body(503, "the server is shutting down"), 503)
        return None


class Job:
    """One request's events, from the scheduler's thread into the event loop, and its metrics and log line."""

    def __init__(self, server: "Server", loop, kind: str):
        self.server, self.loop = server, loop
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handle = None
        self.finished: Finished | None = None   # seen by the event loop
        self.ended = False                      # seen by the scheduler's thread
        self.cut = False                        # cancelled by us after a stop string
        self.t_submit = time.perf_counter()
        self.t_first = self.t_last = None

    def on_event(self, event):  # the scheduler's thread
        now = time.perf_counter()
        if isinstance(event, TokenEvent):
            if self.t_last is not None:
                self.server.metrics.inter_token.observe(now - self.t_last)
            self.t_first = self.t_first or now
            self.t_last = now
        else:
            self.ended = True
            self._record(event, now)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    def cancel(self):
        if not self.ended and self.handle is not None:
            self.server.scheduler.cancel(self.handle)

    def _record(self, f: Finished, now: float):
        reason = "stop" if self.cut and f.reason == "cancelled" else f.reason
        self.server.metrics.finished(reason, f.ttft_s if f.completion_tokens else None, f.queued_s,
                                     now - self.t_submit)
        decode_s = (self.t_last - self.t_first) if self.t_first is not None else 0.0
        rate = (f.completion_tokens - 1) / decode_s if decode_s > 0 else 0.0
        page = self.server.page_size
        log.info("%s %s: prompt %d tokens (%d cached), completion %d tokens, TTFT %.3f s, %.1f tok/s, %d pages%s",
                 self.id, reason, f.prompt_tokens, f.cached_tokens, f.completion_tokens, f.ttft_s, rate,
                 -(-(f.prompt_tokens + f.completion_tokens) // page), f" ({f.error})" if f.error else "")


class Server:
    def __init__(self, engine, scheduler, model_name: str, max_body_bytes: int,
                 body_timeout: float = BODY_TIMEOUT_S):
        if engine.tokenizer is None:
            raise KtjaxError("serving needs a tokenizer: the model folder has no tokenizer.json")
        self.engine, self.scheduler, self.model_name = engine, scheduler, model_name
        self.tokenizer = engine.tokenizer
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout
        stats = scheduler.stats()
        self.page_size = stats.get("page_size", 64)
        self.window = engine.cfg.max_position_embeddings  # a request's prompt + completion
        # what one request can hold: the window, or the whole page pool when that is smaller
        self.context = min(self.window, stats.get("pages_total", self.window) * self.page_size)
        self.vocab = engine.cfg.vocab_size
        self.metrics = ServerMetrics(scheduler)
        self.created = int(time.time())

    # -- routes ---------------------------------------------------------------------------------------------
    async def chat(self, request: Request):
        req = parse_request(ChatRequest, await self._body(request))
        self._check_model(req.model)
        messages = [m.as_template_input() for m in req.messages]
        try:
            prompt = await run_in_threadpool(self.tokenizer.encode_chat, messages)
        except KtjaxError as e:
            raise ApiError(400, f"messages: {e}", "messages") from None
        return await self._serve(request, req, prompt, "chat")

    async def completions(self, request: Request):
        req = parse_request(CompletionRequest, await self._body(request))
        self._check_model(req.model)
        if isinstance(req.prompt, str):
            prompt = await run_in_threadpool(self.tokenizer.encode, req.prompt)
        else:
            prompt = self._check_ids(req.prompt, "prompt")
        return await self._serve(request, req, prompt, "text")

    async def models(self):
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model: str):
        self._check_model(model)
        return self._model_card()

    async def health(self):
        return {"status": "ok"}

    async def metrics_page(self):
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    async def dashboard(self):
        """A live page of memory, cache pages, requests and tokens/s (ktjax/serve/dashboard.html), polling
        /dashboard/data; nothing it loads comes from elsewhere."""
        return HTMLResponse(dashboard_page(), headers={"Cache-Control": "no-cache", "Content-Security-Policy":
                                                       DASHBOARD_POLICY})

    async def dashboard_data(self):
        return {"model": self.model_name, **self.metrics.history.data()}

    # -- checks ---------------------------------------------------------------------------------------------
    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ApiError(413, f"the body of {int(declared)} bytes is over the limit of {self.max_body_bytes}",
                           None, "request_too_large")
        try:
            return await asyncio.wait_for(self._read_body(request), self.body_timeout)
        except asyncio.TimeoutError:  # a client that trickles its body (slowloris) does not hold the server
            raise ApiError(408, f"the body did not arrive within {self.body_timeout:g} s", None,
                           "request_timeout") from None

    async def _read_body(self, request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"the body is over the limit of {self.max_body_bytes} bytes", None,
                               "request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_model(self, name: str):
        if name != self.model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server has {self.model_name!r}", "model",
                           "model_not_found")

    def _check_ids(self, ids: list[int], field: str) -> list[int]:
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise ApiError(400, f"{field}: token id {bad[0]} is outside the vocabulary [0, {self.vocab})", field)
        return ids

    def _params(self, req, prompt_len: int) -> RequestParams:
        field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        limit = req.token_limit
        if limit is not None and limit >= self.window:
            raise ApiError(400, f"{field}={limit}: the model's window is {self.window} tokens, prompt included",
                           field)
        if prompt_len >= self.window or (limit is not None and prompt_len + limit > self.window):
            raise ApiError(413, f"the prompt of {prompt_len} tokens + {field} {limit or 1} exceeds the model's "
                                f"window of {self.window} tokens", "messages" if isinstance(req, ChatRequest)
                           else "prompt", "context_length_exceeded")
        defaults = self.engine.defaults
        self._check_ids(req.stop_ids, "stop")
        return RequestParams(
            max_tokens=limit if limit is not None else max(1, min(defaults.max_new_tokens, self.context - prompt_len)),
            temperature=req.temperature if req.temperature is not None else defaults.temperature,
            top_p=req.top_p if req.top_p is not None else defaults.top_p,
            top_k=req.top_k if req.top_k is not None else defaults.top_k,
            seed=req.seed, stop_token_ids=tuple(req.stop_ids), ignore_eos=req.ignore_eos or defaults.ignore_eos,
            logprobs=req.logprobs_k)

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "ktjax",
                "max_model_len": self.context}

    # -- running one request --------------------------------------------------------------------------------
    async def _serve(self, request: Request, req, prompt: list[int], kind: str):
        params = self._params(req, len(prompt))
        job = Job(self, asyncio.get_running_loop(), kind)
        try:
            job.handle = self.scheduler.submit(prompt, params, job.on_event)
        except PromptTooLong as e:
            raise ApiError(413, str(e), "messages" if kind == "chat" else "prompt", "context_length_exceeded") \
                from None
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", None, "server_busy") from None
        except ShuttingDown as e:
            raise ApiError(503, f"the server is shutting down: {e}") from None
        except KtjaxError as e:
            raise ApiError(400, str(e)) from None
        text = TextStream(self.tokenizer, req.stop_strings, req.stop_ids)
        out = Output(self, job, kind, req)
        watcher = asyncio.create_task(self._cancel_on_disconnect(request, job))
        if req.stream:
            return StreamingResponse(self._sse(job, text, out, req, watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            pieces, events = [], []
            async for piece, used in self._pieces(job, text):
                pieces.append(piece)
                events.extend(used)
        finally:
            watcher.cancel()
            job.cancel()
        reason = self._reason(job, text)
        if reason == "error":
            raise ApiError(500, f"generation failed: {job.finished.error}")
        if reason == "cancelled":
            raise ApiError(503, "the request was cancelled (the server is shutting down)")
        return out.response("".join(pieces), events, reason, self._usage(job, text))

    async def _sse(self, job: Job, text: TextStream, out: "Output", req, watcher):
        try:
            yield sse(out.chunk("", [], None, first=True))
            async for piece, used in self._pieces(job, text):
                yield sse(out.chunk(piece, used, None))
            reason = self._reason(job, text)
            if reason in ("error", "cancelled"):
                message = job.finished.error or "the request was cancelled (the server is shutting down)"
                yield sse(error_body(500 if reason == "error" else 503, message))
            else:
                yield sse(out.chunk("", [], reason))
                if req.include_usage:
                    yield sse(out.usage_chunk(self._usage(job, text)))
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            job.cancel()

    async def _pieces(self, job: Job, text: TextStream):
        """(text, token events) per group of events that arrived together, until Finished."""
        while job.finished is None:
            events = [await job.queue.get()]
            while not job.queue.empty():
                events.append(job.queue.get_nowait())
            pieces, used = [], []
            for event in events:
                if isinstance(event, Finished):
                    job.finished = event
                elif not text.stopped:
                    pieces.append(text.push(event.token_id))
                    used.append(event)
            if text.stopped and job.finished is None and not job.cut:  # a stop string: the rest is not wanted
                job.cut = True
                job.cancel()
            if job.finished is not None:
                pieces.append(text.finish())
            if any(pieces) or used:
                yield "".join(pieces), used

    async def _cancel_on_disconnect(self, request: Request, job: Job):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return

    @staticmethod
    def _reason(job: Job, text: TextStream) -> str:
        if job.finished.reason == "error":
            return "error"
        if text.stopped or job.finished.reason == "stop":
            return "stop"
        return job.finished.reason

    @staticmethod
    def _usage(job: Job, text: TextStream) -> dict:
        f = job.finished
        completion = text.tokens if job.cut else f.completion_tokens
        usage = {"prompt_tokens": f.prompt_tokens, "completion_tokens": completion,
                 "total_tokens": f.prompt_tokens + completion,
                 "prompt_tokens_details": {"cached_tokens": f.cached_tokens}}
        if f.speculative is not None:  # speculative mtp: drafted, accepted, verify_passes
            usage["speculative"] = dict(f.speculative)
        return usage


DASHBOARD_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
                    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@functools.cache
def dashboard_page() -> str:
    return (Path(__file__).parent / "dashboard.html").read_text(encoding="utf-8")


def sse(payload: dict) -> str:
    import json
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


class Output:
    """OpenAI's response shapes: chat ('chat') or text completions ('text'), whole or in chunks."""

    def __init__(self, server: Server, job: Job, kind: str, req):
        self.server, self.kind, self.id = server, kind, job.id
        self.created = int(time.time())
        self.want_logprobs = req.logprobs_k > 0
        self.top = (req.top_logprobs or 0) if kind == "chat" else (req.logprobs or 0)
        self.offset = 0  # characters of text so far (completions' text_offset)

    def _head(self, chunk: bool) -> dict:
        obj = {"chat": "chat.completion", "text": "text_completion"}[self.kind] + (".chunk" if chunk and
                                                                                   self.kind == "chat" else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.server.model_name}

    def chunk(self, text: str, events: list, reason: str | None, first: bool = False) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text or events else {})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        choice["logprobs"] = self.logprobs(events, text) if events and self.want_logprobs else None
        choice["finish_reason"] = reason
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head(True), "choices": [], "usage": usage}

    def response(self, text: str, events: list, reason: str, usage: dict) -> dict:
        lp = self.logprobs(events, text) if self.want_logprobs else None
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp}
        choice["finish_reason"] = reason
        return {**self._head(False), "choices": [choice], "usage": usage}

    def logprobs(self, events: list, text: str) -> dict:
        token = self.server.tokenizer.decode
        if self.kind == "chat":
            def entry(tid, lp):
                s = token([tid])
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**entry(e.token_id, e.logprob),
                                 "top_logprobs": [entry(t, lp) for t, lp in (e.top_logprobs or [])[:self.top]]}
                                for e in events]}
        tokens = [token([e.token_id]) for e in events]
        offsets = []
        for s in tokens:
            offsets.append(self.offset)
            self.offset += len(s)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [{token([t]): lp for t, lp in (e.top_logprobs or [])[:self.top]} for e in events],
                "text_offset": offsets}
