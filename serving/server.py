"""The fill-mask HTTP server: `python -m serving.fill_mask model=<dir> serve=true port=8000`.

    POST /score    the request schema of `serving.masker` -> 200 and the same JSON the CLI prints
    GET  /health   200 {"status": "ok", "model", "vocab_size", "max_tokens", "default_top_k",
                        "batches", "strings"}  (forwards run and strings answered so far)

Requests are parsed, checked and tokenized in the connection's thread (stdlib `ThreadingHTTPServer`);
a bad one is answered at once with 400 and `{"error": "<why>"}` (404 / 405 / 411 / 413 for a wrong
path, method, a missing Content-Length or a body over `MAX_BODY_BYTES`). Good ones go to a queue. One
worker thread runs every forward: it takes the oldest pending request, adds every other pending one
while the batch holds at most `max_batch` strings, runs one padded forward for them all and answers
each. Scores of a string can differ from the CLI's in the last float bits (padding changes the matmul
shapes); the candidates and their order are the same. SIGTERM or Ctrl-C stops the server cleanly.
"""
from __future__ import annotations

import json
import logging
import queue
import signal
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from serving.masker import DEFAULT_TOP_K, Encoded, FillMasker, RequestError, decode_request

log = logging.getLogger("serving.server")

MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted (413 beyond)."""
SOCKET_TIMEOUT_S = 30
"""A connection that sends nothing for this long is closed (a stalled client holds no thread)."""


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


class FillMaskServer(ThreadingHTTPServer):
    """A threading HTTP server holding the masker, the batcher and the service's settings."""

    daemon_threads = True
    request_queue_size = 128  # a burst of concurrent connections is queued, not refused

    def __init__(self, address: tuple[str, int], masker: FillMasker, default_top_k: int = DEFAULT_TOP_K,
                 model_name: str = "", max_batch: int | None = None):
        super().__init__(address, _Handler)
        self.masker, self.default_top_k, self.model_name = masker, default_top_k, model_name
        self.batcher = Batcher(masker, max_batch)
        self.batcher.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, "vocab_size": self.masker.vocab_size,
                "max_tokens": self.masker.max_tokens, "default_top_k": self.default_top_k,
                "batches": self.batcher.batches, "strings": self.batcher.strings}

    def score(self, body: bytes) -> list[list[dict[str, Any]]]:
        """Check and tokenize here (RequestError on a bad request), then wait for the batcher's answer."""
        request = decode_request(body, self.default_top_k)
        self.masker.check_top_k(request.top_k)
        encoded = self.masker.encode(request.strings)
        return self.batcher.submit(encoded, request.top_k).result()

    def server_close(self) -> None:
        super().server_close()
        self.batcher.close()


class _Handler(BaseHTTPRequestHandler):
    server: FillMaskServer
    timeout = SOCKET_TIMEOUT_S
    ROUTES = {"/score": "POST", "/health": "GET"}

    def _send(self, status: HTTPStatus, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"error": message}, headers)

    def _route(self, method: str) -> bool:
        """True when (method, path) is served; otherwise answer 404 / 405 and return False."""
        path = self.path.split("?", 1)[0]
        allowed = self.ROUTES.get(path)
        if allowed is None:
            self._error(HTTPStatus.NOT_FOUND, f"no route {method} {path}; use POST /score or GET /health")
            return False
        if allowed != method:
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes {allowed}, not {method}",
                        {"Allow": allowed})
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's naming)
        if self._route("GET"):
            self._send(HTTPStatus.OK, self.server.health())

    def do_POST(self) -> None:  # noqa: N802
        if not self._route("POST"):
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(HTTPStatus.LENGTH_REQUIRED, "a POST /score needs a Content-Length header")
            return
        if int(length) > MAX_BODY_BYTES:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"body of {length} bytes; the limit is {MAX_BODY_BYTES}")
            return
        body = self.rfile.read(int(length))
        try:
            result = self.server.score(body)
        except RequestError as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return
        except Exception as e:  # a bug, not the client's fault: say so, keep serving
            log.exception("POST /score failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")
            return
        self._send(HTTPStatus.OK, result)

    def _not_allowed(self) -> None:
        self._route(self.command)

    do_PUT = do_DELETE = do_PATCH = _not_allowed

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's signature)
        log.info("%s %s", self.address_string(), format % args)


def serve(masker: FillMasker, host: str, port: int, default_top_k: int = DEFAULT_TOP_K,
          model_name: str = "") -> None:
    """Serve until SIGTERM / SIGINT; prints the address (with the port picked when `port` is 0)."""
    server = FillMaskServer((host, port), masker, default_top_k, model_name)

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    print(f"fill-mask server listening on http://{host}:{server.port} (POST /score, GET /health)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        for s, handler in previous.items():
            signal.signal(s, handler)
