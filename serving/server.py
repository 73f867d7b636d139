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
Content-Length or a body over `MAX_BODY_BYTES`, in the same shape; never the framework's 422). Good ones
go to a queue. One worker thread runs every forward: it takes the oldest pending request, adds every
other pending one while the batch holds at most `max_batch` strings, runs one padded forward for them
all and answers each. Scores of a string can differ from the CLI's in the last float bits (padding
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


class Batcher:
    """The one thread that runs the model: drains the queue into batches of up to `max_batch` strings.

    A job (one request's strings) is never split across batches; one larger than `max_batch` runs alone
    (the masker then splits its forward)."""

    def __init__(self, masker: FillMasker, max_batch: int | None = None):
        self.masker = masker
        self.max_batch = max_batch or masker.max_batch
        self.batches = 0
        """Forwards run (a batch of more than `masker.max_batch` strings counts once)."""
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
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Answer what is queued, then stop the worker."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        carried: _Job | None = None
        while True:
            job = carried if carried is not None else self._queue.get()
            carried = None
            if job is None:
                return
            jobs, size, closing = [job], len(job.encoded), False
            while size < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    closing = True
                    break
                if size + len(nxt.encoded) > self.max_batch:
                    carried = nxt  # first in the next batch
                    break
                jobs.append(nxt)
                size += len(nxt.encoded)
            self._answer(jobs)
            if closing:
                if carried is not None:
                    self._answer([carried])
                return

    def _answer(self, jobs: list[_Job]) -> None:
        encoded = [e for job in jobs for e in job.encoded]
        top_ks = [job.top_k for job in jobs for _ in job.encoded]
        try:
            results = self.masker.predict(encoded, top_ks)
        except Exception as e:  # answer every waiting request instead of leaving it hanging
            log.exception("forward failed")
            for job in jobs:
                job.future.set_exception(e)
            return
        self.batches += 1
        self.strings += len(encoded)
        start = 0
        for job in jobs:
            job.future.set_result(results[start : start + len(job.encoded)])
            start += len(job.encoded)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(masker: FillMasker, default_top_k: int = DEFAULT_TOP_K, model_name: str = "",
               max_batch: int | None = None) -> FastAPI:
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
        body = await request.body()
        try:
            parsed = decode_request(body, default_top_k)
            masker.check_top_k(parsed.top_k)
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
          model_name: str = "") -> None:
    """Serve until SIGTERM / SIGINT; prints the address (with the port picked when `port` is 0) once the
    socket listens, so a client may connect as soon as it reads the line."""
    app = create_app(masker, default_top_k, model_name)
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
