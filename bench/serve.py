"""`ufcpu serve` under load: throughput and p50/p99 latency for 1, 4, 16 and 64 concurrent clients,
each sending single sentences or batches of 32 to /embed, next to offline `Model.encode` of the
same texts in one process.

    python bench/serve.py [--model PATH] [--threads 2] [--clients 1,4,16,64] [--out DIR] [--smoke]

The server runs as its own process (`ufcpu serve`, loopback); the clients are coroutines of one
asyncio process (httpx), each sending its next request when the last one is answered. On a small
machine the clients share the cores with the server: the numbers include that cost. Default
model: the project's random full-size checkpoint (written once into the ufcpu cache).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ufcpu  # noqa: F401  (before NumPy: ufcpu settles OpenBLAS's idle workers, as for any user)
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import fmt, log  # noqa: E402
from common import random_checkpoint  # noqa: E402

WORDS = ("the a of to and in is was for on that with as by at from it an be this are which or his her "
         "city river model paris france capital music history science water energy people language "
         "system north market school summer winter quickly slowly famous ancient modern").split()
SMOKE_DIMS = dict(layers=2, hidden=64, heads=4, depth=3, vocab=512)
MODES = {"single": 1, "batch32": 32}           # texts per request


def sentences(n: int, seed: int) -> list[str]:
    """n sentences of 6-30 words (about 8-40 tokens), as retrieval queries and passages look."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(6, 31)))).capitalize() + "." for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, threads: int, port: int, log_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ufcpu", "serve", "--model", str(model), "--port", str(port), "--threads",
         str(threads), "--max-concurrent-requests", "4096", "--max-client-batch-size", "64"],
        stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))


def wait_ready(httpx, url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready after {timeout_s} s")


async def load(httpx, url: str, clients: int, per_client: int, texts: list[str], size: int) -> dict:
    """clients coroutines, each sending per_client requests of `size` texts one after another."""
    latencies: list[float] = []
    errors = 0

    async def client(c: int, http) -> None:
        nonlocal errors
        for r in range(per_client):
            k = ((c * per_client + r) * size) % len(texts)
            body = {"inputs": (texts + texts)[k:k + size]}
            t = time.perf_counter()
            resp = await http.post(url + "/embed", json=body)
            latencies.append(time.perf_counter() - t)
            errors += resp.status_code != 200

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(c, http) for c in range(min(clients, 2))))   # warm connections, kernels
        latencies.clear()
        t = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - t
    lat = np.array(latencies) * 1000
    n = clients * per_client
    return {"clients": clients, "requests": n, "texts": n * size, "wall_s": wall, "errors": errors,
            "texts_per_s": n * size / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99))}


def offline(model_dir: Path, threads: int, texts: list[str], repeats: int) -> dict:
    m = ufcpu.load(model_dir, threads=threads)
    m.encode(texts[:32])
    samples = common.repeat(lambda: m.encode(texts, batch_size=32), repeats, repeats, 0.0)
    s = common.stats(samples)
    return {"texts": len(texts), "texts_per_s": len(texts) / s["median_s"], **s}


def markdown(points: list[dict], off: dict, meta: dict) -> str:
    rows = []
    for p in points:
        one = next(q for q in points if q["mode"] == p["mode"] and q["clients"] == 1)
        rows.append([p["mode"], p["clients"], p["requests"], fmt(p["texts_per_s"]), fmt(p["p50_ms"]),
                     fmt(p["p99_ms"]), f"{p['texts_per_s'] / off['texts_per_s']:.2f}",
                     f"{p['texts_per_s'] / one['texts_per_s']:.2f}", p["errors"]])
    return (f"# ufcpu serve under load\n\n{meta['model']}; server and offline at {meta['threads']} thread(s); "
            f"{meta['cores']} cores shared by server and clients; loadavg at start {meta['loadavg']}.\n\n"
            + common.md_table(["mode", "clients", "requests", "texts/s", "p50 ms", "p99 ms", "x offline",
                               "x 1 client", "errors"], rows)
            + f"\n\nOffline `Model.encode(texts, batch_size=32)` of {off['texts']} of the same texts in one "
              f"process: {fmt(off['texts_per_s'])} texts/s (median of {off['repeats']}).\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the project's random full-size one)")
    ap.add_argument("--threads", type=int, default=None, help="server and offline threads (default: all cores)")
    ap.add_argument("--clients", default=None, help="concurrent client counts (default 1,4,16,64; --smoke: 1,4)")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, a few requests per point")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    httpx = common.optional("httpx")
    if httpx is None or common.optional("uvicorn") is None:
        raise SystemExit("serve.py needs httpx and the server extra: pip install -e \".[test,server]\"")
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:   # keep everything the smoke run writes inside --out
        os.environ["UFCPU_CACHE"] = str((args.out / "cache").resolve())
    from ufcpu import hub
    cache = hub.cache_dir() / "bench"
    source = args.model or random_checkpoint(cache / ("random-smoke" if args.smoke else "random-full-seed0"),
                                             SMOKE_DIMS if args.smoke else None)
    model_dir, _ = hub.resolve(source, log=log)
    threads = args.threads or len(os.sched_getaffinity(0))
    clients = common.parse_ints(args.clients or ("1,4" if args.smoke else "1,4,16,64"))
    texts = sentences(64 if args.smoke else 512, args.seed)
    info = common.machine_info()

    off = offline(model_dir, threads, texts, 1 if args.smoke else 3)
    log(f"offline encode: {off['texts_per_s']:.0f} texts/s")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(tempfile.mkdtemp(prefix="ufcpu-bench-serve-")) / "server.log"   # shown if the server fails
    proc = start_server(model_dir, threads, port, log_path)
    points = []
    try:
        wait_ready(httpx, url, proc, log_path)
        for mode, size in MODES.items():
            for c in clients:
                total = (8 if args.smoke else 256) // size or (1 if args.smoke else 4)
                per_client = max(1 if args.smoke or size > 1 else 2, total // c)
                p = asyncio.run(load(httpx, url, c, per_client, texts, size))
                p["mode"] = mode
                points.append(p)
                log(f"{mode} x {c} clients: {p['texts_per_s']:.0f} texts/s, p50 {p['p50_ms']:.1f} ms, "
                    f"p99 {p['p99_ms']:.1f} ms, {p['errors']} errors")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    meta = {"model": (f"{source}" if args.model else "the project's random checkpoint in the exact Hub layout"
                      + (" (smoke dimensions)" if args.smoke else " (full size)")),
            "threads": threads, "cores": os.cpu_count(), "loadavg": info["loadavg_at_start"]}
    md = markdown(points, off, meta)
    info["loadavg_at_end"] = common.loadavg()
    common.write_json(args.out / "serve.json", {
        "benchmark": "serve", "smoke": args.smoke, "machine": info, "model": meta["model"],
        "threads": threads, "server_exit_code": code, "offline": off, "points": points,
        "wall_s": time.perf_counter() - started})
    common.write_text(args.out / "serve.md", md)
    print(md)
    return 1 if code != 0 or any(p["errors"] for p in points) else 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
