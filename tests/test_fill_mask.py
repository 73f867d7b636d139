"""Fill-mask: the model card's request against a tiny trained checkpoint, the CLI, the HTTP server.

The checkpoint is trained by the real trainer (tests/checkpoint_fixtures.py); the server is the real
CLI in a subprocess (`serve=true port=0`), spoken to over HTTP from this process.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import pytest
from checkpoint_fixtures import REPO, trained_runs

from serving.masker import FillMasker, RequestError, decode_request, load_fill_masker, parse_request
from serving.server import Batcher

SAMPLE = REPO / "tests" / "assets" / "fill_mask_request.json"
KEYS = {"score", "token", "token_str", "sequence"}
SENTENCES = [f"The {w} is a <mask> of the system." for w in
             ("hacker", "kernel", "program", "user", "machine", "file", "wizard", "bug")] + [
    "A <mask> is a program.", "It was written in <mask>.", "<mask> is the answer.", "The end of the <mask>"]


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.fill_mask", *args], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=120)


def request(strings: list[str], top_k: int | None = None) -> dict:
    req: dict = {"inputs": {"input_string": strings}}
    if top_k is not None:
        req["parameters"] = {"top_k": top_k}
    return req


def assert_same(a: list[list[dict]], b: list[list[dict]], tol: float = 1e-6) -> None:
    """Same candidates in the same order; scores within `tol` (padding changes the last float bits)."""
    assert len(a) == len(b)
    for row_a, row_b in zip(a, b):
        assert [(c["token"], c["token_str"], c["sequence"]) for c in row_a] == \
               [(c["token"], c["token_str"], c["sequence"]) for c in row_b]
        assert all(abs(x["score"] - y["score"]) <= tol for x, y in zip(row_a, row_b))


def filled(text: str, candidate: dict, masker: FillMasker) -> str:
    """The input with its mask filled: <mask> takes the space before it (lstrip) and the token brings its
    own; a special token is left out of the sequence (decoded without special tokens, as HF's pipeline)."""
    special = candidate["token"] in (0, 1, 2, 3, masker.mask_id)
    return text.replace(" <mask>", "" if special else candidate["token_str"])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, jargon_corpus, jargon_tokenizer) -> Path:
    """The run directory of the one-process tiny run (fill-mask resolves checkpoints/latest)."""
    return trained_runs(tmp_path_factory, jargon_corpus, jargon_tokenizer)["torch"]


@pytest.fixture(scope="module")
def masker(ckpt) -> FillMasker:
    return load_fill_masker(ckpt)


# ---------------------------------------------------------------------------------------------------
# the CLI and the schema


def test_model_card_request(ckpt, masker):
    proc = run_cli(f"model={ckpt}", f"request={SAMPLE}")
    assert proc.returncode == 0, proc.stderr
    sample = json.loads(SAMPLE.read_text())
    strings, top_k = sample["inputs"]["input_string"], sample["parameters"]["top_k"]
    result = json.loads(proc.stdout)
    assert len(result) == len(strings)
    for text, row in zip(strings, result):
        assert len(row) == top_k
        for c in row:
            assert set(c) == KEYS
            assert isinstance(c["score"], float) and 0.0 < c["score"] <= 1.0
            assert isinstance(c["token"], int) and 0 <= c["token"] < masker.vocab_size
            assert c["token_str"] == masker.tokenizer.decode([c["token"]], skip_special_tokens=False)
            assert c["sequence"] == filled(text, c, masker)
        scores = [c["score"] for c in row]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) <= 1.0 + 1e-6
    assert_same(result, masker(parse_request(sample)))  # the CLI's process and this one agree


def test_scores_are_the_softmax_over_the_whole_vocabulary(masker):
    [row] = masker(parse_request(request(["The <mask> is here."], top_k=masker.vocab_size)))
    assert len(row) == masker.vocab_size
    assert sorted(c["token"] for c in row) == list(range(masker.vocab_size))  # nothing excluded
    assert sum(c["score"] for c in row) == pytest.approx(1.0, abs=1e-4)


def test_default_top_k_and_stdin(ckpt):
    stdin = json.dumps(request(["A <mask> is a program."]))
    proc = run_cli(f"model={ckpt}", "request=-", "top_k=3", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert [len(row) for row in json.loads(proc.stdout)] == [3]


def test_padded_batch_equals_one_string_at_a_time(masker):
    batched = masker(parse_request(request(SENTENCES, top_k=4)))
    alone = [masker(parse_request(request([s], top_k=4)))[0] for s in SENTENCES]
    assert_same(batched, alone)


BAD_REQUESTS = [
    ('{"inputs": ', "malformed JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"inputs": {"input_string": ["a <mask>"]}, "extra": 1}', "unknown request key"),
    ('{"inputs": ["a <mask>"]}', '"inputs" must be an object'),
    ('{"inputs": {"input_string": "a <mask>"}}', "must be a list of strings"),
    ('{"inputs": {"input_string": ["a <mask>", 3]}}', "must be a list of strings"),
    ('{"inputs": {"input_string": []}}', "is empty"),
    ('{"inputs": {"input_string": ["a <mask>"]}, "parameters": [2]}', '"parameters" must be an object'),
    ('{"inputs": {"input_string": ["a <mask>"]}, "parameters": {"top_k": "2"}}', "must be an integer"),
    ('{"inputs": {"input_string": ["a <mask>"]}, "parameters": {"top_k": true}}', "must be an integer"),
    ('{"inputs": {"input_string": ["a <mask>"]}, "parameters": {"topk": 2}}', "unknown parameter"),
    ('{"inputs": {"input_string": ["a <mask>"]}, "parameters": {"top_k": 0}}', "out of range"),
    ('{"inputs": {"input_string": ["a <mask>"]}, "parameters": {"top_k": 8193}}', "out of range"),
    ('{"inputs": {"input_string": ["no mask here"]}}', "has 0 <mask> tokens"),
    ('{"inputs": {"input_string": ["fine <mask>", "<mask> and <mask>"]}}',
     "input_string[1] has 2 <mask> tokens"),
    (json.dumps(request(["word " * 600 + "<mask>"])), "the model takes at most 512"),
    ('{"inputs": {"input_string": ["bad \\ud800 <mask>"]}}', "input_string[0] is not valid Unicode"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
]


@pytest.mark.parametrize("body,message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_request_is_refused_with_its_reason(masker, body, message):
    with pytest.raises(RequestError, match=re.escape(message)):
        masker(decode_request(body))


def test_longest_input_is_the_models_max_seq_len(masker):
    """max_positions 514 with pad id 1: 512 tokens with <s> and </s> pass, 513 do not."""
    fits, too_long = " a" * 509 + " <mask>", " a" * 510 + " <mask>"
    assert [len(e.ids) for e in masker.encode([fits])] == [512]
    [row] = masker(parse_request(request([fits], top_k=1)))
    assert row[0]["sequence"] == filled(fits, row[0], masker)
    with pytest.raises(RequestError, match="is 513 tokens with <s> and </s>; the model takes at most 512"):
        masker.encode([too_long])


def test_cli_bad_request_exits_nonzero_with_message(ckpt, tmp_path):
    proc = run_cli(f"model={ckpt}", "request=-", stdin='{"inputs": {"input_string": ["<mask> and <mask>"]}}')
    assert proc.returncode == 2 and proc.stdout == ""
    assert "has 2 <mask> tokens; each string needs exactly one" in proc.stderr
    proc = run_cli(f"model={ckpt}", "request=/nonexistent.json")
    assert proc.returncode == 2 and "request=/nonexistent.json: no such file" in proc.stderr
    bad = tmp_path / "latin1.json"
    bad.write_bytes('{"inputs": {"input_string": ["caf\u00e9 <mask>"]}}'.encode("latin-1"))
    proc = run_cli(f"model={ckpt}", f"request={bad}")
    assert proc.returncode == 2 and "not UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(f"model={ckpt}")  # neither request nor serve
    assert proc.returncode == 2 and "give request=" in proc.stderr


def test_batcher_drains_pending_jobs_into_batches(masker):
    """Jobs queued before the worker starts: [1, 2, 1 | 2, 1] strings with max_batch 4 -> 2 forwards,
    each job answered with its own strings."""
    batcher = Batcher(masker, max_batch=4)
    groups = [SENTENCES[0:1], SENTENCES[1:3], SENTENCES[3:4], SENTENCES[4:6], SENTENCES[6:7]]
    futures = [batcher.submit(masker.encode(g), top_k=2 + i) for i, g in enumerate(groups)]
    batcher.start()
    answers = [f.result(timeout=60) for f in futures]
    batcher.close()
    assert batcher.batches == 2 and batcher.strings == 7
    for i, (g, answer) in enumerate(zip(groups, answers)):
        assert_same(answer, masker(parse_request(request(g, top_k=2 + i))))


class SteppedMasker:
    """The real masker, whose every forward waits for a permit: the test decides when forwards run."""

    def __init__(self, masker: FillMasker):
        self.masker, self.max_batch = masker, masker.max_batch
        self.permits = threading.Semaphore(0)

    def predict(self, encoded, top_ks):
        assert self.permits.acquire(timeout=60), "no permit for a forward"
        return self.masker.predict(encoded, top_ks)


def test_a_large_request_does_not_starve_a_small_one(masker):
    """A 64-string request over forwards of 4 rows (16 forwards) is running when a 1-string request comes:
    the small one is answered within 2 forwards (the one the worker already took, and the next, which it
    shares), while the large one is still far from done; both answers are the masker's own."""
    stepped = SteppedMasker(masker)
    batcher = Batcher(stepped, max_batch=4)  # type: ignore[arg-type]
    large_strings = [SENTENCES[i % len(SENTENCES)] for i in range(64)]
    large = batcher.submit(masker.encode(large_strings), top_k=3)
    batcher.start()
    stepped.permits.release()
    while batcher.batches < 1:
        time.sleep(0.001)
    small = batcher.submit(masker.encode([SENTENCES[3]]), top_k=2)
    forwards = 0
    while not small.done():
        assert forwards < 2, "the small request waited more than 2 forwards behind the large one"
        stepped.permits.release()
        forwards += 1
        deadline = time.time() + 60
        while batcher.batches < 1 + forwards and time.time() < deadline:
            time.sleep(0.001)
    assert not large.done() and batcher.batches <= 3
    assert_same(small.result(), masker(parse_request(request([SENTENCES[3]], top_k=2))))
    for _ in range(16):
        stepped.permits.release()
    assert_same(large.result(timeout=60), masker(parse_request(request(large_strings, top_k=3))))
    batcher.close()
    assert batcher.strings == 65 and batcher.batches == 17  # 65 strings in forwards of 4: nothing wasted


def test_batcher_shares_each_forward_fairly(masker):
    """Three pending requests of 10, 1 and 10 strings, forwards of 4: every row used (6 forwards for 21
    strings), each answer its own."""
    batcher = Batcher(masker, max_batch=4)
    groups = [SENTENCES[:10], SENTENCES[10:11], [*SENTENCES[2:12]]]
    futures = [batcher.submit(masker.encode(g), top_k=1 + i) for i, g in enumerate(groups)]
    batcher.start()
    answers = [f.result(timeout=60) for f in futures]
    batcher.close()
    assert batcher.batches == 6 and batcher.strings == 21  # ceil(21 / 4)
    for i, (g, answer) in enumerate(zip(groups, answers)):
        assert_same(answer, masker(parse_request(request(g, top_k=1 + i))))


# ---------------------------------------------------------------------------------------------------
# the server


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server") / "stderr.txt"


@pytest.fixture(scope="module")
def server(ckpt, server_log):
    """`python -m serving.fill_mask serve=true port=0` in a subprocess; yields its base URL."""
    log = server_log
    with open(log, "w") as err:
        cmd = [sys.executable, "-m", "serving.fill_mask", f"model={ckpt}", "serve=true", "port=0"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()  # blocks until the server prints its address (or dies: "")
        assert "listening on http://127.0.0.1:" in line, log.read_text()[-3000:]
        yield line.split("listening on ")[1].split()[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, log.read_text()[-3000:]


def http(url: str, body: bytes | None = None, method: str | None = None) -> tuple[int, object]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_health(server, masker):
    status, body = http(f"{server}/health")
    assert status == 200 and body["status"] == "ok"
    assert body["vocab_size"] == masker.vocab_size and body["max_tokens"] == 512


def test_server_answers_like_the_cli(server, ckpt):
    proc = run_cli(f"model={ckpt}", f"request={SAMPLE}")
    status, body = http(f"{server}/score", SAMPLE.read_bytes())
    assert status == 200
    assert_same(body, json.loads(proc.stdout))


def test_server_refuses_bad_requests_and_keeps_serving(server):
    for body, message in BAD_REQUESTS:
        status, answer = http(f"{server}/score", body.encode())
        assert status == 400, (body, answer)
        assert message in answer["error"]
    status, answer = http(f"{server}/nowhere", b"{}")
    assert status == 404 and "POST /score" in answer["error"]
    status, answer = http(f"{server}/score", method="GET")
    assert status == 405 and "takes POST" in answer["error"]
    status, answer = http(f"{server}/score", SAMPLE.read_bytes())
    assert status == 200 and len(answer) == 2


def test_server_burst_of_concurrent_requests(server, masker):
    """32 threads at once, each its own request (1-2 strings, top_k 1-4): every answer is right."""
    n = len(SENTENCES)
    requests = [request([SENTENCES[i % n]] + ([SENTENCES[(i + 5) % n]] if i % 2 else []), top_k=1 + i % 4)
                for i in range(32)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(lambda r: http(f"{server}/score", json.dumps(r).encode()), requests))
    for req, (status, body) in zip(requests, answers):
        assert status == 200
        assert_same(body, masker(parse_request(req)))
    status, health = http(f"{server}/health")
    assert health["strings"] >= sum(len(r["inputs"]["input_string"]) for r in requests)


def test_server_refuses_oversized_and_unsized_bodies(server):
    host, port = server.split("//")[1].split(":")
    conn = HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/score")
    conn.putheader("Content-Length", str(2 << 20))  # refused on the header, before the body is sent
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "the limit is 1048576" in json.loads(resp.read())["error"]
    conn.close()
    conn = HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/score")
    conn.putheader("Content-Length", "\u00b2".encode("utf-8"))  # '²': str.isdigit() says yes
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 400  # answered (by us or by the HTTP parser), not a 500 and not silence
    resp.read()
    conn.close()
    conn = HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/score", body=iter([SAMPLE.read_bytes()]), encode_chunked=True,
                 headers={"Content-Type": "application/json"})  # chunked: no Content-Length
    resp = conn.getresponse()
    assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
    conn.close()
    status, answer = http(f"{server}/score", SAMPLE.read_bytes())
    assert status == 200 and len(answer) == 2  # still serving


def test_openapi_describes_the_request_and_response_schema(server):
    status, spec = http(f"{server}/openapi.json")
    assert status == 200
    post = spec["paths"]["/score"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/FillMaskBody"}
    schemas = spec["components"]["schemas"]
    body = schemas["FillMaskBody"]
    assert body["required"] == ["inputs"] and body["additionalProperties"] is False
    inputs = schemas["FillMaskInputs"]["properties"]["input_string"]
    assert inputs["type"] == "array" and inputs["items"] == {"type": "string"} and inputs["minItems"] == 1
    top_k = schemas["FillMaskParameters"]["properties"]["top_k"]
    assert {"type": "integer"} in top_k["anyOf"] and top_k["minimum"] == 1
    answer = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["type"] == "array" and answer["items"]["type"] == "array"
    assert answer["items"]["items"] == {"$ref": "#/components/schemas/Candidate"}
    candidate = schemas["Candidate"]
    assert sorted(candidate["properties"]) == ["score", "sequence", "token", "token_str"]
    assert candidate["properties"]["token"]["type"] == "integer"
    refs = json.dumps(spec).count('"$ref": "#/components/schemas/')
    assert all(ref.split('"')[0] in schemas for ref in json.dumps(spec).split('#/components/schemas/')[1:])
    assert refs >= 4
    req = urllib.request.Request(f"{server}/docs")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200 and b"swagger" in resp.read().lower()


def test_server_under_load_answers_as_the_cli(server, masker):
    """64 concurrent clients x 20 requests each over real HTTP: every answer equals the CLI's (the same
    masker, one string at a time), and concurrent requests share forwards."""
    n = len(SENTENCES)
    bodies = [request([SENTENCES[i % n]] + ([SENTENCES[(i * 7 + 3) % n]] if i % 3 == 0 else []), top_k=1 + i % 5)
              for i in range(64 * 20)]
    want = {}
    for b in bodies:
        key = json.dumps(b)
        if key not in want:
            want[key] = masker(parse_request(b))
    _, before = http(f"{server}/health")

    def client(c: int) -> list[tuple[dict, int, object]]:
        return [(b, *http(f"{server}/score", json.dumps(b).encode())) for b in bodies[c * 20:(c + 1) * 20]]

    with ThreadPoolExecutor(max_workers=64) as pool:
        answers = [a for chunk in pool.map(client, range(64)) for a in chunk]
    assert len(answers) == 1280
    for body, status, answer in answers:
        assert status == 200, answer
        assert_same(answer, want[json.dumps(body)])
    _, after = http(f"{server}/health")
    strings = sum(len(b["inputs"]["input_string"]) for b in bodies)
    assert after["strings"] - before["strings"] == strings
    assert after["batches"] - before["batches"] < len(bodies)  # batched: fewer forwards than requests


def test_server_limits_the_work_of_one_request(server):
    """More strings than max_strings, or strings x top_k over max_candidates: 413 naming the limit."""
    status, answer = http(f"{server}/score", json.dumps(request(["a <mask>."] * 1025)).encode())
    assert status == 413 and "1025 strings in one request; the limit is max_strings=1024" in answer["error"]
    status, answer = http(f"{server}/score", json.dumps(request(SENTENCES[:3] * 22, top_k=300)).encode())
    assert status == 413 and "66 strings x top_k 300 = 19800 candidates; the limit is max_candidates=16384" \
        in answer["error"]
    status, answer = http(f"{server}/score", json.dumps(request(["a <mask>."] * 1024)).encode())
    assert status == 200 and len(answer) == 1024


def test_server_answers_a_small_request_while_a_large_one_runs(server, masker):
    """A 1024-string request (16 forwards of 64) is running when a 1-string request comes: the small one
    is answered first, after a few of the server's forwards (counted by /health, not timed)."""
    large_strings = [("word " * 40) + s for s in SENTENCES] * (1024 // len(SENTENCES) + 1)
    large_body = json.dumps(request(large_strings[:1024], top_k=1)).encode()
    _, before = http(f"{server}/health")
    with ThreadPoolExecutor(max_workers=1) as pool:
        large = pool.submit(http, f"{server}/score", large_body)
        while http(f"{server}/health")[1]["batches"] == before["batches"]:
            assert not large.done(), large.result()
            time.sleep(0.01)
        _, started = http(f"{server}/health")
        status, small = http(f"{server}/score", json.dumps(request([SENTENCES[0]], top_k=2)).encode())
        _, answered = http(f"{server}/health")
        small_done_first = not large.done()
        assert large.result()[0] == 200
    assert status == 200 and small_done_first
    # 2 here (the forward in flight, then the one it shares); 4 leaves room for a slow event loop, far
    # below the 16 forwards of the large request it would wait for without sharing
    assert answered["batches"] - started["batches"] <= 4, (started, answered)
    assert_same(small, masker(parse_request(request([SENTENCES[0]], top_k=2))))


def test_a_client_that_disconnects_is_one_line_in_the_log(server, server_log):
    body = json.dumps(request(SENTENCES)).encode()
    host, port = server.split("//")[1].split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body[:40])
    deadline = time.time() + 30
    while server_log.read_text().count("disconnected before sending its body") < 3:
        assert time.time() < deadline, server_log.read_text()[-3000:]
        time.sleep(0.05)
    assert "Traceback" not in server_log.read_text() and "ClientDisconnect" not in server_log.read_text()
    status, answer = http(f"{server}/score", SAMPLE.read_bytes())
    assert status == 200 and len(answer) == 2
