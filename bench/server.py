"""Benchmark of the fill-mask HTTP server under concurrent load (a benchmark, not a test).

    python -m bench.server [clients=64] [requests=20] [runs=3] [model=<HF dir>]

Starts `python -m serving.fill_mask model=<dir> serve=true port=0` (the real server, in its own
process), waits for its address, then `clients` threads each send `requests` POST /score requests one
after the other (a new connection each, 1 or 2 strings with one <mask>, top_k 1-4). Reports, as the
median of `runs` runs: requests/s (all answers over wall time), p50 and p99 latency (ms) over every
request of the run, and the forwards the server ran (`/health`: fewer forwards than requests means
concurrent requests were batched). Every answer is checked to be a 200 with one list per string.

Without `model=` it builds its own: a tokenizer trained on the bundled Jargon File (vocab 8192) and a
randomly initialised `conf/model/tiny` RoBERTa exported to an HF directory (the timing is the server's,
not the model's quality).
"""
from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.report import report
from core.cli import command

REPO = Path(__file__).resolve().parents[1]
SENTENCES = [
    "The <mask> is the hacker's favourite tool.", "A kludge is a <mask> solution.",
    "Real programmers use <mask>.", "The <mask> crashed again.", "<mask> is a four-letter word.",
    "He hacked the <mask> all night.", "Never trust a <mask> that works the first time.",
]


@dataclass
class BenchServerArgs:
    """The settings of `python -m bench.server` (conf/commands/bench_server.yaml)."""

    clients: int = 64
    """Concurrent clients (threads), each sending its requests one after the other."""
    requests: int = 20
    """Requests per client per run."""
    runs: int = 3
    """Runs (the median is reported)."""
    model: str = ""
    """HF directory to serve; empty: a random tiny model with a Jargon File tokenizer, built here."""
    out: str = ""
    """Also write the figures to this JSON file."""


def build_model(directory: Path) -> Path:
    import torch

    from core.hf import save_hf
    from core.model import RobertaConfig, RobertaForMaskedLM
    from data_prep.build_tokenizer import BuildTokenizerArgs, build_tokenizer

    build_tokenizer(BuildTokenizerArgs(output_dir=str(directory), input=str(REPO / "data" / "jargon.txt.gz"),
                                       vocab_size=8192, progress=False))
    torch.manual_seed(0)
    save_hf(RobertaForMaskedLM(RobertaConfig.from_preset("tiny")).eval(), directory)
    return directory


def body(i: int) -> bytes:
    strings = [SENTENCES[i % len(SENTENCES)]] + ([SENTENCES[(i + 3) % len(SENTENCES)]] if i % 2 else [])
    return json.dumps({"inputs": {"input_string": strings}, "parameters": {"top_k": 1 + i % 4}}).encode()


def post(host: str, port: int, data: bytes) -> tuple[int, object, float]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=120)
    try:
        conn.request("POST", "/score", body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        return resp.status, answer, time.perf_counter() - start
    finally:
        conn.close()


def get(host: str, port: int, path: str) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def load(host: str, port: int, clients: int, requests: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            i = c * requests + r
            status, answer, seconds = post(host, port, body(i))
            n = 1 + i % 2
            if status != 200 or not isinstance(answer, list) or len(answer) != n:
                raise RuntimeError(f"request {i}: status {status}, answer {str(answer)[:200]}")
            with lock:
                latencies.append(seconds)

    before = get(host, port, "/health")["batches"]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    forwards = get(host, port, "/health")["batches"] - before
    latencies.sort()
    return {"requests_per_s": len(latencies) / wall, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "forwards": forwards, "requests": len(latencies)}


def bench(args: BenchServerArgs) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_server_") as tmp:
        model = args.model or str(build_model(Path(tmp) / "hf"))
        cmd = [sys.executable, "-m", "serving.fill_mask", f"model={model}", "serve=true", "port=0"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            if "listening on http://" not in line:
                raise RuntimeError(f"the server did not start: {line!r}")
            host, port = line.split("http://")[1].split()[0].split(":")
            load(host, int(port), 4, 5)  # warm-up
            runs = [load(host, int(port), args.clients, args.requests) for _ in range(args.runs)]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    result = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
    return {"clients": args.clients, "requests_per_client": args.requests, "runs": args.runs, **result}


@command("bench_server", BenchServerArgs, refused=(RuntimeError, OSError))
def main(args: BenchServerArgs) -> int:
    report(bench(args), args.out)
    return 0


if __name__ == "__main__":
    main()
