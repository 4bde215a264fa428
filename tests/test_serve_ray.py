"""The Ray Serve deployment (ufcpu/integrations/ray_serve.py) on a small local Ray runtime: /embed and
/v1/embeddings answer as `ufcpu serve` does, concurrent requests as serial ones. Skipped without
ray[serve]; one runtime for the module (Ray is slow to start on small machines)."""
from __future__ import annotations

import base64
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from conftest import DATA, load_fixture  # noqa: E402

TEXTS = ["The capital of France is Paris.", "hello", "a somewhat longer sentence, with a comma and more words", "x"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    import ray
    from ufcpu.integrations.ray_serve import UfcpuEmbeddings
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(UfcpuEmbeddings.options(ray_actor_options={"num_cpus": 1}).bind(
            model=str(DATA / "tiny-ufb"), threads=1), route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_embed_and_openai_routes(url):
    m = load_fixture("tiny-ufb")
    want = m.encode(TEXTS, normalize=True)
    got = httpx.post(url + "/embed", json={"inputs": TEXTS}, timeout=120)
    assert got.status_code == 200, got.text
    np.testing.assert_allclose(np.array(got.json()), want, atol=1e-5)
    raw = httpx.post(url + "/embed", json={"inputs": TEXTS[0], "normalize": False, "dimensions": 8}, timeout=120).json()
    np.testing.assert_allclose(np.array(raw)[0], m.encode(TEXTS[0])[:8], atol=1e-5)
    oa = httpx.post(url + "/v1/embeddings", json={"input": TEXTS, "model": "m", "encoding_format": "base64"},
                    timeout=120).json()
    assert oa["object"] == "list" and oa["model"] == "m" and [d["index"] for d in oa["data"]] == [0, 1, 2, 3]
    vecs = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in oa["data"]])
    np.testing.assert_allclose(vecs, want, atol=1e-5)
    assert oa["usage"]["prompt_tokens"] == sum(len(x) for x in m.tokenizer.encode_ids(TEXTS)[0])


def test_concurrent_requests_and_errors(url):
    m = load_fixture("tiny-ufb")
    with ThreadPoolExecutor(8) as pool:
        resp = list(pool.map(lambda t: httpx.post(url + "/embed", json={"inputs": [t]}, timeout=120), TEXTS * 4))
    assert [r.status_code for r in resp] == [200] * 16
    for r, t in zip(resp, TEXTS * 4):
        np.testing.assert_allclose(np.array(r.json())[0], m.encode(t, normalize=True), atol=1e-5)
    bad = httpx.post(url + "/embed", json={"inputs": 3}, timeout=120)
    assert bad.status_code == 422 and "must be a string" in bad.json()["error"]
    assert httpx.post(url + "/v1/embeddings", content=b"{", timeout=120).json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(url + "/nowhere", json={}, timeout=120).status_code == 404
