"""`ufcpu serve`: the real server as a subprocess on a free loopback port, driven with httpx (TEI
routes) and the official openai client (/v1/embeddings). Results are compared with model.encode;
nothing here depends on timing (readiness is polled with a generous timeout)."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from conftest import DATA, load_fixture  # noqa: E402

TEXTS = ["The capital of France is Paris.", "hello", "a somewhat longer sentence, with a comma and more words",
         "x", "Numbers 1 2 3 and symbols #@!", "another text about the weather today"]
READY_TIMEOUT_S = 120
WORDS = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".split()


def long_text(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] + str(i % 7) for i in range(n))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, model: str, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ufcpu", "serve", "--model", str(DATA / model), "--port", str(self.port),
             "--threads", "1", *args], stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=dict(os.environ))

    def wait_ready(self, headers=None) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr()
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {READY_TIMEOUT_S} s: {self.stderr()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def stderr(self) -> str:
        return self.log.read_text()

    def metric(self, line_start: str) -> float:
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.split()[-1])
        return 0.0


def _started(tmp_path_factory, model: str, *args: str):
    srv = Server(tmp_path_factory.mktemp("serve"), model, *args)
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        log = srv.stderr()
        assert code == 0, log[-3000:]
        assert "Traceback" not in log and " 500 " not in log, log[-3000:]


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    yield from _started(tmp_path_factory, "tiny-ufb", "--max-client-batch-size", "64")


@pytest.fixture(scope="module")
def cls(tmp_path_factory):
    yield from _started(tmp_path_factory, "tiny-ufb-cls")


KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Tight limits and an API key."""
    yield from _started(tmp_path_factory, "tiny-ufb", "--max-concurrent-requests", "2", "--max-client-batch-size",
                        "4", "--payload-limit", "4096", "--api-key", KEY)


def post(srv, route: str, body, headers=None) -> httpx.Response:
    return httpx.post(srv.url + route, json=body, headers=headers, timeout=60)


def model():
    return load_fixture("tiny-ufb")


# --- TEI routes -----------------------------------------------------------------------------------

def test_embed_equals_encode(mlm):
    r = post(mlm, "/embed", {"inputs": TEXTS})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()), model().encode(TEXTS, normalize=True), atol=1e-5)
    one = post(mlm, "/embed", {"inputs": TEXTS[0], "normalize": False}).json()
    np.testing.assert_allclose(np.array(one), model().encode(TEXTS[:1]), atol=1e-5)
    for h in ("x-compute-time", "x-queue-time", "x-inference-time"):
        assert float(r.headers[h]) >= 0
    phases = dict(p.split(";dur=") for p in r.headers["server-timing"].split(", "))
    assert list(phases) == ["read", "tokenize", "queue", "compute", "wake", "encode", "total"]
    assert all(float(v) >= 0 for v in phases.values())
    assert float(phases["total"]) >= float(phases["compute"]) == pytest.approx(float(r.headers["x-inference-time"]))


def test_int8_server_embeds_as_the_int8_model(tmp_path_factory):
    started = _started(tmp_path_factory, "tiny-ufb", "--precision", "int8")
    with contextlib.closing(started):                 # the server stops (and is checked) on any failure
        srv = next(started)
        assert post(srv, "/embed", {"inputs": "x"}).status_code == 200
        assert httpx.get(srv.url + "/info", timeout=60).json()["precision"] == "int8"
        r = post(srv, "/embed", {"inputs": TEXTS, "normalize": False})
        assert r.status_code == 200, r.text
        want = load_fixture("tiny-ufb", precision="int8").encode(TEXTS)
        np.testing.assert_allclose(np.array(r.json()), want, atol=1e-5)
        assert np.abs(want - model().encode(TEXTS)).max() > 1e-5   # int8, not float32, answered


def test_embed_dimensions(mlm):
    got = np.array(post(mlm, "/embed", {"inputs": TEXTS[:2], "dimensions": 16}).json())
    full = model().encode(TEXTS[:2])[:, :16]
    np.testing.assert_allclose(got, full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-5)


def test_embed_all_gives_each_texts_tokens(mlm):
    got = post(mlm, "/embed_all", {"inputs": TEXTS[:3], "normalize": False}).json()
    want = model().encode(TEXTS[:3], pooling="none")
    assert [len(g) for g in got] == [len(w) for w in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.array(g), w, atol=1e-5)


def test_truncation_right_left_and_refused(mlm):
    m, text = model(), long_text(300)
    r = post(mlm, "/embed", {"inputs": text})
    assert r.status_code == 422 and r.json()["error_type"] == "Validation" and "truncate" in r.json()["error"]
    right = post(mlm, "/embed", {"inputs": text, "truncate": True, "normalize": False}).json()
    np.testing.assert_allclose(np.array(right)[0], m.encode(text), atol=1e-5)
    left = post(mlm, "/embed", {"inputs": text, "truncate": True, "truncation_direction": "left",
                                "normalize": False}).json()
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(m.tokenizer.path))
    tok.no_truncation()
    ids = tok.encode(text, add_special_tokens=False).ids
    sep = tok.token_to_id("<sep>")
    last = np.array(ids[-(m.config.max_seq - 1):] + [sep])           # the last 127 tokens, then <sep>
    np.testing.assert_allclose(np.array(left)[0], m.hidden_states(last[None])[0].mean(axis=0), atol=1e-5)
    assert not np.allclose(left, right, atol=1e-3)


def test_embed_long_document_in_chunks(mlm):
    text = long_text(500)
    got = post(mlm, "/embed", {"inputs": [text, "short"], "chunk_tokens": 64, "stride": 16}).json()
    want = model().encode([text, "short"], chunk_tokens=64, stride=16, normalize=True)
    np.testing.assert_allclose(np.array(got), want, atol=1e-5)
    r = post(mlm, "/embed", {"inputs": text, "chunk_tokens": 64, "stride": 63})
    assert r.status_code == 422 and "stride" in r.json()["error"]


def test_tokenize_and_decode(mlm):
    toks = post(mlm, "/tokenize", {"inputs": ["Hello world", "x"]}).json()
    m = model()
    assert [[t["id"] for t in seq] for seq in toks] == [list(x) for x in m.tokenizer.encode_ids(["Hello world", "x"])[0]]
    first = toks[0]
    assert first[-1]["special"] and first[-1]["text"] == "<sep>" and not first[0]["special"]
    assert "Hello world"[first[0]["start"]:first[0]["stop"]].lower() == first[0]["text"]
    ids = [t["id"] for t in first]
    assert post(mlm, "/decode", {"ids": ids}).json() == [m.tokenizer.decode(ids)]
    assert post(mlm, "/decode", {"ids": [ids], "skip_special_tokens": False}).json()[0].endswith("<sep>")
    long = post(mlm, "/tokenize", {"inputs": long_text(300)}).json()[0]
    assert len(long) == 128 and long[-1]["text"] == "<sep>" and sum(t["special"] for t in long) == 1
    assert [t["id"] for t in long] == list(m.tokenizer.encode_ids([long_text(300)])[0][0])


def test_fill_mask_route(mlm):
    got = post(mlm, "/fill-mask", {"inputs": "The capital of France is [MASK].", "top_k": 3}).json()
    assert got == model().fill_mask("The capital of France is [MASK].", top_k=3)


def test_info_health_models_metrics(mlm):
    info = httpx.get(mlm.url + "/info").json()
    assert info["max_input_length"] == 128 and info["max_client_batch_size"] == 64
    assert info["model_type"] == {"embedding": {"pooling": "mean"}} and info["precision"] == "float32"
    assert httpx.get(mlm.url + "/health").status_code == 200
    assert httpx.get(mlm.url + "/v1/models").json()["data"][0]["id"] == info["model_id"]
    post(mlm, "/embed", {"inputs": "count me"})
    text = httpx.get(mlm.url + "/metrics").text
    for name in ("ufcpu_requests_total{route=\"/embed\",status=\"200\"}", "ufcpu_queue_depth",
                 "ufcpu_batch_inputs_bucket", "ufcpu_tokens_total", "ufcpu_request_duration_seconds_bucket"):
        assert name in text
    assert mlm.metric('ufcpu_requests_total{route="/embed",status="200"}') >= 1


@pytest.mark.parametrize("route,body,status,match", [
    ("/embed", b'{"inputs": ', 422, "not valid JSON"),
    ("/embed", b'["a"]', 422, "must be a JSON object"),
    ("/embed", b'\xff\xfe', 422, "not valid JSON"),
    ("/embed", {"inputs": 5}, 422, "must be a string or an array of strings"),
    ("/embed", {"inputs": ["a", 3]}, 422, "`inputs`[1] must be a string"),
    ("/embed", {"inputs": []}, 422, "cannot be empty"),
    ("/embed", {"inputs": ""}, 422, "empty string"),
    ("/embed", {"inputs": "a", "normalize": "yes"}, 422, "`normalize` must be a boolean"),
    ("/embed", {"inputs": "a", "truncation_direction": "up"}, 422, "truncation_direction"),
    ("/embed", {"inputs": "a", "dimensions": 0}, 422, "`dimensions` must be in 1..128"),
    ("/embed", {"inputs": "a", "stride": 3}, 422, "`stride` needs `chunk_tokens`"),
    ("/embed", {"inputs": ["a"] * 65}, 413, "batch size 65 > maximum allowed batch size 64"),
    ("/embed", {"inputs": "lone \ud800 surrogate"}, 422, ""),
    ("/predict", {"inputs": "a"}, 422, "needs a classification checkpoint"),
    ("/fill-mask", {"inputs": "no mask here"}, 422, "no mask token"),
    ("/decode", {"ids": ["a"]}, 422, "`ids` must be"),
    ("/nowhere", {}, 404, "Not Found"),
])
def test_client_mistakes_are_4xx_json(mlm, route, body, status, match):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(mlm.url + route, content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()
    assert match in err["error"] and err["error_type"]


def test_predict_route(cls):
    m = load_fixture("tiny-ufb-cls")
    one = post(cls, "/predict", {"inputs": "a fine film"}).json()
    probs = m.predict(["a fine film"])[0]["probabilities"]
    assert {d["label"] for d in one} == {f"LABEL_{i}" for i in range(len(probs))}
    assert sorted(d["score"] for d in one) == pytest.approx(sorted(probs), abs=1e-5)
    assert one[0]["score"] == max(d["score"] for d in one)
    batch = post(cls, "/predict", {"inputs": ["a", ["premise", "hypothesis"]], "raw_scores": True}).json()
    logits = m.classify(["a", ("premise", "hypothesis")])
    for got, want in zip(batch, logits):
        assert sorted(d["score"] for d in got) == pytest.approx(sorted(want.tolist()), abs=1e-5)
    pair = post(cls, "/predict", {"inputs": ["premise", "hypothesis"], "raw_scores": True}).json()
    assert sorted(d["score"] for d in pair) == pytest.approx(sorted(logits[1].tolist()), abs=1e-5)
    assert post(cls, "/fill-mask", {"inputs": "a <mask>"}).status_code == 422
    assert httpx.get(cls.url + "/info").json()["model_type"]["classifier"]["id2label"]


# --- OpenAI ---------------------------------------------------------------------------------------

def test_openai_client_float_and_base64(mlm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=mlm.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    want = model().encode(TEXTS, normalize=True)
    res = client.embeddings.create(input=TEXTS, model="tiny", encoding_format="float")
    assert [d.index for d in res.data] == list(range(len(TEXTS))) and res.model == "tiny"
    np.testing.assert_allclose(np.array([d.embedding for d in res.data]), want, atol=1e-5)
    tokens = sum(len(x) for x in model().tokenizer.encode_ids(TEXTS)[0])
    assert res.usage.prompt_tokens == res.usage.total_tokens == tokens
    raw = client.embeddings.create(input=TEXTS, model="tiny", encoding_format="base64")
    got = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in raw.data])
    np.testing.assert_allclose(got, want, atol=1e-5)
    default = client.embeddings.create(input=TEXTS[0], model="tiny")       # the client asks for base64 and decodes it
    np.testing.assert_allclose(np.array(default.data[0].embedding), want[0], atol=1e-5)
    small = client.embeddings.create(input=TEXTS[:2], model="tiny", dimensions=8)
    assert len(small.data[0].embedding) == 8
    ids = [x.tolist() for x in model().tokenizer.encode_ids(TEXTS[:2])[0]]
    by_ids = client.embeddings.create(input=ids, model="tiny", encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in by_ids.data]), want[:2], atol=1e-5)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.embeddings.create(input=[[1, 2, 10 ** 9]], model="tiny")
    assert "token ids" in str(e.value)
    r = post(mlm, "/v1/embeddings", {"input": 3})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error"


# --- concurrency, limits, shutdown ----------------------------------------------------------------

def test_concurrent_clients_get_serial_answers(mlm):
    rng = np.random.default_rng(0)
    requests = [[TEXTS[i] for i in rng.integers(0, len(TEXTS), rng.integers(1, 4))] for _ in range(48)]
    serial = [np.array(post(mlm, "/embed", {"inputs": r}).json()) for r in requests]
    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=32)) as c:
        with ThreadPoolExecutor(16) as pool:
            resp = list(pool.map(lambda r: c.post(mlm.url + "/embed", json={"inputs": r}), requests))
    assert [r.status_code for r in resp] == [200] * len(requests)
    for got, want, texts in zip(resp, serial, requests):
        np.testing.assert_allclose(np.array(got.json()), want, atol=1e-5)
        np.testing.assert_allclose(want, model().encode(texts, normalize=True), atol=1e-5)
    assert mlm.metric("ufcpu_batch_inputs_count") >= 1


class HeldRequest:
    """A request whose body is sent in two parts: between them it is in flight, deterministically."""

    def __init__(self, srv, body: dict, headers: dict | None = None):
        raw = json.dumps(body).encode()
        self.rest = raw[len(raw) // 2:]
        head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
        self.sock.sendall(f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}"
                          f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw[:len(raw) // 2])

    def finish(self) -> tuple[int, bytes]:
        self.sock.sendall(self.rest)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        self.sock.close()
        return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def wait_until(cond, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_overload_is_429_never_5xx(small):
    held = [HeldRequest(small, {"inputs": "held"}, AUTH) for _ in range(2)]
    wait_until(lambda: small.metric("ufcpu_requests_in_flight") == 2, "two requests in flight")
    with ThreadPoolExecutor(8) as pool:
        burst = list(pool.map(lambda _: post(small, "/embed", {"inputs": "more"}, AUTH), range(16)))
    assert {r.status_code for r in burst} == {429}
    assert burst[0].json()["error_type"] == "Overloaded"
    assert httpx.get(small.url + "/health").status_code == 200          # probes are never refused
    results = [h.finish() for h in held]
    assert [s for s, _ in results] == [200, 200]
    np.testing.assert_allclose(np.array(json.loads(results[0][1]))[0], model().encode("held", normalize=True), atol=1e-5)
    assert post(small, "/embed", {"inputs": "after"}, AUTH).status_code == 200


def test_api_key_and_size_limits(small):
    assert post(small, "/embed", {"inputs": "a"}).status_code == 401
    assert post(small, "/embed", {"inputs": "a"}, {"Authorization": "Bearer wrong"}).json()["error_type"] == "Unauthorized"
    r = post(small, "/v1/embeddings", {"input": "a"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert post(small, "/embed", {"inputs": ["a"] * 5}, AUTH).status_code == 413
    big = post(small, "/embed", {"inputs": "word " * 2000}, AUTH)
    assert big.status_code == 413 and "limit is 4096" in big.json()["error"]
    chunked = httpx.post(small.url + "/embed", content=iter([b'{"inputs": "', b"w" * 5000, b'"}']),
                         headers={**AUTH, "content-type": "application/json"}, timeout=60)
    assert chunked.status_code == 413
    assert httpx.get(small.url + "/health").status_code == 200
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=small.url + "/v1", api_key="wrong", max_retries=0).embeddings.create(input="a", model="m")
    good = openai.OpenAI(base_url=small.url + "/v1", api_key=KEY, max_retries=0)
    assert len(good.embeddings.create(input="a", model="m").data[0].embedding) == 128


def test_sigterm_answers_requests_in_flight(tmp_path):
    srv = Server(tmp_path, "tiny-ufb")
    try:
        srv.wait_ready()
        held = [HeldRequest(srv, {"inputs": [f"in flight {i}"]}) for i in range(3)]
        wait_until(lambda: srv.metric("ufcpu_requests_in_flight") == 3, "three requests in flight")
        srv.proc.send_signal(signal.SIGTERM)

        def refused() -> bool:   # the listening socket closes first
            try:
                socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
                return False
            except OSError:
                return True
        wait_until(refused, "the server to stop accepting")
        results = [h.finish() for h in held]
        assert [s for s, _ in results] == [200, 200, 200]
        for i, (_, body) in enumerate(results):
            np.testing.assert_allclose(np.array(json.loads(body))[0], model().encode(f"in flight {i}", normalize=True),
                                       atol=1e-5)
        assert srv.proc.wait(timeout=60) == 0
    finally:
        srv.stop()
    assert "Traceback" not in srv.stderr()


def test_unloadable_model_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "empty-model"
    bad.mkdir()
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "ufcpu", "serve", "--model", str(bad), "--port", str(port)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "cannot load the model" in line]
    assert len(errors) == 1 and str(bad) in errors[0] and "Traceback" not in proc.stderr
