"""The fill-mask HTTP server: `python -m serving.fill_mask model=<dir> serve=true port=8000`.

FastAPI on uvicorn (one process, one event loop):

    POST /score    the request schema of `serving.masker` (FillMaskBody) -> 200 and the same JSON the
                   CLI prints (FillMaskResponse)
    GET  /health   200 {"status": "ok", "model", "vocab_size", "max_tokens", "default_top_k",
                        "batches", "strings"}  (forwards run and strings answered so far)
    GET  /openapi.json, /docs    the schema, typed from the pydantic models of `serving.masker`

A request is parsed and checked by the same code as the CLI's (`serving.masker.decode_request`, so the
messages are the same), then tokenized in a worker thread of the server's pool; a bad one is answered
at once with 400 and `{"error": "<why>"}` (404 / 405 / 411 / 413 for a wrong path, method, a missing
Content-Length, a body over `MAX_BODY_BYTES` or more work than `Limits` allows: strings per request,
strings x top_k per answer; in the same shape; never the framework's 422). Good ones go to a queue. One
worker thread runs every forward of up to `max_batch` strings, shared fairly between the pending
requests (`Batcher`): a small request waits for at most the forward in flight, however large the
requests ahead of it. Scores of a string can differ from the CLI's in the last float bits (padding
changes the matmul shapes); the candidates and their order are the same. SIGTERM or Ctrl-C stops the
server cleanly: uvicorn stops accepting, answers what is in flight, then the batcher drains.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import signal
import socket
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from serving.masker import (
    DEFAULT_TOP_K,
    Encoded,
    FillMaskBody,
    FillMasker,
    FillMaskResponse,
    RequestError,
    decode_request,
)

log = logging.getLogger("serving.server")

MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted (413 beyond)."""
KEEP_ALIVE_S = 30
"""An idle keep-alive connection is closed after this long."""
ROUTES = {"/score": "POST", "/health": "GET"}


@dataclass
class _Job:
    encoded: list[Encoded]
    top_k: int
    future: Future = field(default_factory=Future)
    taken: int = 0
    """Strings handed to forwards so far."""
    results: list[list[dict[str, Any]]] = field(default_factory=list)


class Batcher:
    """The one thread that runs the model: forwards of up to `max_batch` strings, shared fairly.

    Every pending request (job) gets an equal share of each forward's rows (the rows a job cannot use go
    to the others); a job larger than its share continues in the next forward, behind the jobs that were
    left out of this one. So a request waits for at most the forward in flight before its strings run,
    however large the requests ahead of it: a large one cannot starve small ones."""

    def __init__(self, masker: FillMasker, max_batch: int | None = None):
        self.masker = masker
        self.max_batch = max_batch or masker.max_batch
        self.batches = 0
        """Forwards run."""
        self.strings = 0
        """Strings answered."""
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="fill-mask-batcher", daemon=True)

    def start(self) -> None:
        """Start the worker (jobs submitted before wait for it)."""
        self._thread.start()

    def submit(self, encoded: list[Encoded], top_k: int) -> Future:
        """Queue checked strings; the future's result is their candidate lists."""
        job = _Job(encoded, top_k)
        if not encoded:
            job.future.set_result([])
            return job.future
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Answer what is queued, then stop the worker."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        active: list[_Job] = []  # in the order they are served next
        closing = False
        while active or not closing:
            block = not active
            while True:  # take what is queued, waiting only when there is nothing to do
                try:
                    job = self._queue.get(block=block)
                except queue.Empty:
                    break
                block = False
                if job is None:
                    closing = True
                else:
                    active.append(job)
            if active:
                active = self._forward(active)

    def _shares(self, active: list[_Job]) -> list[int]:
        """Rows of the next forward for each active job: equal shares in serving order, then the rows
        left over (jobs smaller than their share) to the jobs that want more, in the same order."""
        shares, room = [0] * len(active), self.max_batch
        for i, job in enumerate(active):
            share = min(max(1, room // (len(active) - i)), len(job.encoded) - job.taken, room)
            shares[i], room = share, room - share
        for i, job in enumerate(active):
            extra = min(room, len(job.encoded) - job.taken - shares[i])
            shares[i], room = shares[i] + extra, room - extra
        return shares

    def _forward(self, active: list[_Job]) -> list[_Job]:
        """Run one forward; answer the jobs it finishes; return the jobs still active, in serving order
        (those left out of this forward first)."""
        shares = self._shares(active)
        served = [(job, job.taken, job.taken + n) for job, n in zip(active, shares) if n]
        encoded = [e for job, a, b in served for e in job.encoded[a:b]]
        top_ks = [job.top_k for job, a, b in served for _ in range(a, b)]
        try:
            results = self.masker.predict(encoded, top_ks)
        except Exception as e:  # answer every request of this forward instead of leaving it hanging
            log.exception("forward failed")
            for job, _, _ in served:
                job.future.set_exception(e)
            return [job for job, n in zip(active, shares) if not n]
        self.batches += 1
        self.strings += len(encoded)
        start = 0
        for job, a, b in served:
            job.results.extend(results[start : start + b - a])
            job.taken, start = b, start + b - a
            if job.taken == len(job.encoded):
                job.future.set_result(job.results)
        left_out = [job for job, n in zip(active, shares) if not n]
        return left_out + [job for job, _, _ in served if job.taken < len(job.encoded)]


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@dataclass(frozen=True)
class Limits:
    """The most work one request may ask for; beyond, 413 naming the limit (the FillMaskArgs keys)."""

    max_strings: int = 1024
    """Strings in one request."""
    max_candidates: int = 16384
    """Candidates in one answer: strings x top_k (the response's size)."""

    def check(self, strings: int, top_k: int) -> str | None:
        if strings > self.max_strings:
            return f"{strings} strings in one request; the limit is max_strings={self.max_strings}"
        if strings * top_k > self.max_candidates:
            return (f"{strings} strings x top_k {top_k} = {strings * top_k} candidates; the limit is "
                    f"max_candidates={self.max_candidates}")
        return None


def create_app(masker: FillMasker, default_top_k: int = DEFAULT_TOP_K, model_name: str = "",
               max_batch: int | None = None, limits: Limits = Limits()) -> FastAPI:
    """The ASGI app: routes, the error shape, and the batcher's life (started and drained with the app)."""
    batcher = Batcher(masker, max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.close)  # answer what is queued, then stop the worker

    app = FastAPI(title="fill-mask", version="1", lifespan=lifespan,
                  description="RoBERTa fill-mask in the model card's real-time endpoint schema.")
    app.state.batcher = batcher

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path, method = request.url.path, request.method
        if exc.status_code == 404:
            return error(404, f"no route {method} {path}; use POST /score or GET /health")
        if exc.status_code == 405 and path in ROUTES:
            return error(405, f"{path} takes {ROUTES[path]}, not {method}", {"Allow": ROUTES[path]})
        return error(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and counters: forwards run (`batches`) and strings answered so far."""
        return {"status": "ok", "model": model_name, "vocab_size": masker.vocab_size,
                "max_tokens": masker.max_tokens, "default_top_k": default_top_k,
                "batches": batcher.batches, "strings": batcher.strings}

    @app.post("/score", response_model=FillMaskResponse,
              responses={400: {"description": "A bad request: `{\"error\": \"<why>\"}`"}},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/FillMaskBody"}}}}})
    async def score(request: Request) -> Any:
        """Top-k candidates for the one `<mask>` of each string, best first."""
        length = request.headers.get("content-length")
        if length is None:
            return error(411, "a POST /score needs a Content-Length header")
        if not (length.isascii() and length.isdigit()):
            return error(400, f"Content-Length {length!r} is not a number of bytes")
        if int(length) > MAX_BODY_BYTES:
            return error(413, f"body of {length} bytes; the limit is {MAX_BODY_BYTES}")
        try:
            body = await request.body()
        except ClientDisconnect:  # gone before its body arrived: nobody to answer, nothing to log but a line
            log.info("POST /score: the client disconnected before sending its body")
            return error(400, "the client disconnected before sending its body")  # delivered to nobody
        try:
            parsed = decode_request(body, default_top_k)
            masker.check_top_k(parsed.top_k)
        except RequestError as e:
            return error(400, str(e))
        too_much = limits.check(len(parsed.strings), parsed.top_k)
        if too_much:
            return error(413, too_much)
        try:
            encoded = await run_in_threadpool(masker.encode, parsed.strings)
        except RequestError as e:
            return error(400, str(e))
        try:
            return await asyncio.wrap_future(batcher.submit(encoded, parsed.top_k))
        except Exception as e:  # a bug, not the client's fault: say so, keep serving
            log.exception("POST /score failed")
            return error(500, f"{type(e).__name__}: {e}")

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, plus the request body's (the route reads the raw body, to answer a bad one
        with the CLI's message instead of the framework's 422)."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            body = FillMaskBody.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}))
            components["FillMaskBody"] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def serve(masker: FillMasker, host: str, port: int, default_top_k: int = DEFAULT_TOP_K,
          model_name: str = "", limits: Limits = Limits()) -> None:
    """Serve until SIGTERM / SIGINT; prints the address (with the port picked when `port` is 0) once the
    socket listens, so a client may connect as soon as it reads the line."""
    app = create_app(masker, default_top_k, model_name, limits=limits)
    sock = socket.create_server((host, port), backlog=1024)
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S, access_log=False,
                            limit_concurrency=None)
    # uvicorn takes SIGTERM / SIGINT for its graceful shutdown, then raises the signal again for the handler
    # it found: let that be one that notes it, so that a requested stop ends with exit code 0.
    previous = {s: signal.signal(s, _stopped) for s in (signal.SIGTERM, signal.SIGINT)}
    print(f"fill-mask server listening on http://{host}:{sock.getsockname()[1]} (POST /score, GET /health)",
          flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stopped(signum: int, _frame: Any) -> None:
    log.info("signal %s: stopped", signal.Signals(signum).name)
