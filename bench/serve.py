"""`ufcpu serve` under load: throughput and p50/p99 latency for 1, 4, 16 and 64 concurrent clients,
each sending single sentences or batches of 32 to /embed, next to offline `Model.encode` of the
same texts in one process.

    python bench/serve.py [--model PATH] [--threads 2] [--clients 1,4,16,64] [--modes single,batch32] [--rounds N]
                          [--requests 256] [--precision float32|int8] [--server-arg ARG ...]
                          [--server-env KEY=VALUE ...] [--out DIR] [--smoke]

The server runs as its own process (`ufcpu serve`, loopback); the clients are coroutines of this
process, each on its own kept-alive connection (raw asyncio streams: a few tens of microseconds
of CPU per request, where an HTTP client library costs a millisecond), each sending its next
request when the last one is answered. On a small machine the clients share the cores with the
server: the numbers include that cost. Per point it also reports the median of each phase of the
server's Server-Timing header (where a request's time goes inside the server; the client's
latency minus the server's total is HTTP, the kernel's loopback and the client) and the batch
sizes the server formed (its /metrics histogram). Default model: the project's random full-size
checkpoint (written once into the ufcpu cache). Results: `serve-<precision>.md` and `.json`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
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


def start_server(model: Path, threads: int, port: int, log_path: Path, env: dict, precision: str,
                 extra: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ufcpu", "serve", "--model", str(model), "--port", str(port), "--threads",
         str(threads), "--precision", precision, "--max-concurrent-requests", "4096", "--max-client-batch-size", "64",
         *extra],
        stdout=subprocess.DEVNULL, stderr=open(log_path, "w"), env={**os.environ, **env})


def wait_ready(port: int, proc: subprocess.Popen, log_path: Path, timeout_s: float = 300) -> None:
    async def healthy() -> bool:
        conn = Connection(port)
        try:
            return (await asyncio.wait_for(conn.request("GET", "/health"), 5))[0] == 200
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            return False
        finally:
            conn.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log_path.read_text()[-2000:]}")
        if asyncio.run(healthy()):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready after {timeout_s} s")


class Connection:
    """One kept-alive HTTP/1.1 connection on raw asyncio streams: the cheapest client there is, so
    that the clients take as little as possible of the cores they share with the server."""

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in head[1:] if line)
        return int(head[0].split()[1]), headers, await self.reader.readexactly(int(headers["content-length"]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def phases(header: str) -> dict:
    """'read;dur=0.2, compute;dur=21.3' -> {"read": 0.2, "compute": 21.3} (ms)"""
    return {name: float(dur) for name, dur in (p.split(";dur=") for p in header.split(", ") if ";dur=" in p)}


def batch_sizes(metrics_text: str) -> dict:
    """The server's /metrics -> {"count", "sum", "le": {bucket: cumulative count}} of inputs per batch."""
    out = {"count": 0.0, "sum": 0.0, "le": {}}
    for line in metrics_text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("ufcpu_batch_inputs_bucket{le=\""):
            out["le"][name.split('"')[1]] = float(value)
        elif name in ("ufcpu_batch_inputs_count", "ufcpu_batch_inputs_sum"):
            out[name.rsplit("_", 1)[1]] = float(value)
    return out


def batch_histogram(before: dict, after: dict) -> dict:
    """The batches formed between two scrapes: how many, mean inputs, and count per size bucket."""
    n = after["count"] - before["count"]
    cum = {b: after["le"][b] - before["le"].get(b, 0.0) for b in after["le"]}
    per, prev = {}, 0.0
    for b, c in cum.items():
        if c - prev:
            per[b] = int(c - prev)
        prev = c
    return {"batches": int(n), "mean_inputs": (after["sum"] - before["sum"]) / n if n else 0.0, "inputs_le": per}


async def scrape(port: int) -> dict:
    conn = Connection(port)
    try:
        return batch_sizes((await conn.request("GET", "/metrics"))[2].decode())
    finally:
        conn.close()


async def load(port: int, clients: int, per_client: int, texts: list[str], size: int) -> dict:
    """clients coroutines, each on its own connection sending per_client requests of `size` texts
    one after another."""
    latencies: list[float] = []
    server: list[dict] = []
    errors = 0
    bodies = [json.dumps({"inputs": (texts + texts)[k:k + size]}).encode() for k in range(0, len(texts), size)]

    async def client(c: int, conn: Connection) -> None:
        nonlocal errors
        for r in range(per_client):
            body = bodies[(c * per_client + r) % len(bodies)]
            t = time.perf_counter()
            status, headers, _ = await conn.request("POST", "/embed", body)
            latencies.append(time.perf_counter() - t)
            server.append(phases(headers.get("server-timing", "")))
            errors += status != 200

    conns = [Connection(port) for _ in range(clients)]
    try:
        await asyncio.gather(*(client(c, conns[c]) for c in range(min(clients, 2))))   # warm connections, kernels
        await asyncio.gather(*(conn.request("GET", "/health") for conn in conns))      # open every connection
        latencies.clear()
        server.clear()
        before = await scrape(port)
        t = time.perf_counter()
        await asyncio.gather(*(client(c, conns[c]) for c in range(clients)))
        wall = time.perf_counter() - t
        after = await scrape(port)
    finally:
        for conn in conns:
            conn.close()
    lat = np.array(latencies) * 1000
    n = clients * per_client
    names = [k for k in server[0] if all(k in p for p in server)] if server else []
    med = {k: float(np.median([p[k] for p in server])) for k in names}
    if "total" in names:   # per request: the client's latency minus the server's own time
        med["outside_server"] = float(np.median(lat - np.array([p["total"] for p in server])))
    return {"clients": clients, "requests": n, "texts": n * size, "wall_s": wall, "errors": errors,
            "texts_per_s": n * size / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "phases_p50_ms": med, **batch_histogram(before, after)}


def offline_samples(model_dir: Path, threads: int, texts: list[str], repeats: int, precision: str) -> list[float]:
    """Seconds of each `Model.encode(texts, batch_size=32)`, in this process."""
    ufcpu.settings.tune_malloc()   # as in the server, which the ufcpu command starts
    m = ufcpu.load(model_dir, threads=threads, precision=precision)
    m.encode(texts[:32])
    return common.repeat(lambda: m.encode(texts, batch_size=32), repeats, repeats, 0.0)


def offline(texts: list[str], before: list[float], after: list[float]) -> dict:
    """The offline rate from runs before and after the serving points: this host's speed drifts by
    10-20% within minutes, and the serving points lie between the two."""
    s = common.stats(before + after)
    return {"texts": len(texts), "texts_per_s": len(texts) / s["median_s"], **s,
            "before_texts_per_s": len(texts) / float(np.median(before)),
            "after_texts_per_s": len(texts) / float(np.median(after))}


PHASES = ("read", "tokenize", "queue", "compute", "wake", "encode", "total", "outside_server")


def combine_rounds(rounds: list[tuple[list[dict], dict]]) -> tuple[list[dict], dict]:
    """[(points, offline)] of each round -> (points, offline) with each figure the median over the
    rounds. The ratios (x offline, x the 1-client rate) are taken within each round, whose
    points saw the same machine, and each point keeps them per round ("rounds_x_offline",
    "rounds_x_one") with their median ("x_offline", "x_one"); errors add up."""
    offs = [off for _, off in rounds]
    off = {**offs[-1], "texts_per_s": float(np.median([o["texts_per_s"] for o in offs])),
           "rounds_texts_per_s": [o["texts_per_s"] for o in offs]}
    points = []
    for i, last in enumerate(rounds[-1][0]):
        runs = [pts[i] for pts, _ in rounds]
        x_off = [p["texts_per_s"] / o["texts_per_s"] for p, o in zip(runs, offs)]
        ones = [next((q for q in pts if q["mode"] == last["mode"] and q["clients"] == 1), None) for pts, _ in rounds]
        x_one = [p["texts_per_s"] / q["texts_per_s"] for p, q in zip(runs, ones) if q is not None]
        points.append({**last, **{k: float(np.median([p[k] for p in runs]))
                                  for k in ("texts_per_s", "p50_ms", "p99_ms", "mean_inputs")},
                       "errors": sum(p["errors"] for p in runs),
                       "rounds_texts_per_s": [p["texts_per_s"] for p in runs],
                       "rounds_x_offline": x_off, "x_offline": float(np.median(x_off)),
                       "rounds_x_one": x_one, "x_one": float(np.median(x_one)) if x_one else None})
    return points, off


def _ratio(p: dict, key: str) -> str:   # "0.81" or, over rounds, "0.81 (0.76-0.85)"
    if p.get(key) is None:
        return ""
    values = p[f"rounds_{key}"]
    return f"{p[key]:.2f}" + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")




def _offline_text(off: dict) -> str:
    rounds = off.get("rounds_texts_per_s", [])
    if len(rounds) > 1:
        return (f"{fmt(off['texts_per_s'])} texts/s, the median of the rounds' {', '.join(fmt(v) for v in rounds)} "
                f"(each the median of {off['repeats']} runs, half before the round's serving points and half after)")
    return (f"{fmt(off['texts_per_s'])} texts/s (median of {off['repeats']}, half before the serving points and "
            f"half after: {fmt(off['before_texts_per_s'])} and {fmt(off['after_texts_per_s'])})")


def markdown(points: list[dict], off: dict, meta: dict) -> str:
    rows, split = [], []
    for p in points:
        rows.append([p["mode"], p["clients"], p["requests"], fmt(p["texts_per_s"]), fmt(p["p50_ms"]),
                     fmt(p["p99_ms"]), _ratio(p, "x_offline"), _ratio(p, "x_one"), fmt(p["mean_inputs"]),
                     p["errors"]])
        split.append([p["mode"], p["clients"], *(fmt(p["phases_p50_ms"].get(k)) for k in PHASES)])
    hist = "\n".join(f"- {p['mode']} x {p['clients']}: {p['batches']} batches, "
                     + ", ".join(f"{n} of <= {b}" for b, n in p["inputs_le"].items()) for p in points)
    return (f"# ufcpu serve under load\n\n{meta['model']}; server and offline at {meta['threads']} thread(s), {meta['precision']}"
            f"{' (server: ' + ' '.join(meta['server_args']) + ')' if meta['server_args'] else ''}; "
            f"{meta['cores']} cores shared by the server and the clients (one asyncio process, raw "
            f"kept-alive connections); loadavg at start {meta['loadavg']}, at end {meta['loadavg_end']}."
            + (f" {meta['rounds']} rounds, each with its own server and offline runs: the figures of the first "
               f"table are medians over the rounds, each ratio taken within a round, its median given with its "
               f"range; the phases and batch sizes are the last round's."
               if meta["rounds"] > 1 else "") + "\n\n"
            + common.md_table(["mode", "clients", "requests", "texts/s", "p50 ms", "p99 ms", "x offline",
                               "x 1 client", "inputs/batch", "errors"], rows)
            + f"\n\nOffline `Model.encode(texts, batch_size=32)` of {off['texts']} of the same texts in one "
              f"process: {_offline_text(off)}.\n\n"
            + "Where a request's time goes (medians, ms; the server's Server-Timing phases: read = body "
              "and JSON parse, wake = batch end until the handler runs again, encode = the JSON answer; "
              "outside_server = the client's latency minus the server's total: HTTP, loopback, client):\n\n"
            + common.md_table(["mode", "clients", *PHASES], split)
            + f"\n\nBatches the server formed (inputs per batch, from /metrics):\n\n{hist}\n")


def one_round(args, model_dir: Path, threads: int, clients: tuple, modes: dict, texts: list[str],
              server_env: dict) -> tuple[list[dict], dict, int]:
    """Offline runs, a fresh server driven at every point, offline runs again -> (points, offline,
    the server's exit code)."""
    repeats = 1 if args.smoke else 3
    before = offline_samples(model_dir, threads, texts, repeats, args.precision)
    log(f"offline encode: {len(texts) / np.median(before):.0f} texts/s")
    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="ufcpu-bench-serve-")) / "server.log"   # shown if the server fails
    proc = start_server(model_dir, threads, port, log_path, server_env, args.precision, args.server_arg)
    points = []
    try:
        wait_ready(port, proc, log_path)
        for mode, size in modes.items():
            for c in clients:
                total = (8 if args.smoke else args.requests) // size or (1 if args.smoke else 4)
                # single sentences: at least 8 turns per client, so that the batches settle
                per_client = max(1 if args.smoke or size > 1 else 8, total // c)
                p = asyncio.run(load(port, c, per_client, texts, size))
                p["mode"] = mode
                points.append(p)
                log(f"{mode} x {c} clients: {p['texts_per_s']:.1f} texts/s, p50 {p['p50_ms']:.1f} ms, "
                    f"p99 {p['p99_ms']:.1f} ms, {p['mean_inputs']:.1f} inputs/batch, {p['errors']} errors; "
                    + " ".join(f"{k} {v:.2f}" for k, v in p["phases_p50_ms"].items()))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    off = offline(texts, before, offline_samples(model_dir, threads, texts, repeats, args.precision))
    log(f"offline encode after the server: {off['after_texts_per_s']:.0f} texts/s")
    return points, off, code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the project's random full-size one)")
    ap.add_argument("--threads", type=int, default=None, help="server and offline threads (default: all cores)")
    ap.add_argument("--clients", default=None, help="concurrent client counts (default 1,4,16,64; --smoke: 1,4)")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"request kinds (default {','.join(MODES)})")
    ap.add_argument("--requests", type=int, default=256, help="texts sent per point (default 256; --smoke: 8)")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of the server process only, for A/B runs (repeatable)")
    ap.add_argument("--precision", default="float32", help="server and offline precision (default float32)")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="one more `ufcpu serve` argument, e.g. --server-arg=--return-wait-ms=0 (repeatable)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, a few requests per point")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=common.positive_int, default=1,
                    help="run everything N times (offline and a fresh server each time); report medians, "
                         "each ratio taken within its round (default 1)")
    args = ap.parse_args(argv)
    if common.optional("uvicorn") is None or common.optional("starlette") is None:
        raise SystemExit("serve.py needs the server extra: pip install -e \".[server]\"")
    modes = {m: MODES[m] for m in args.modes.split(",")}
    server_env = dict(kv.split("=", 1) for kv in args.server_env)
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

    rounds, codes = [], []
    for k in range(args.rounds):
        if args.rounds > 1:
            log(f"round {k + 1} of {args.rounds}")
        points, off, code = one_round(args, model_dir, threads, clients, modes, texts, server_env)
        rounds.append((points, off))
        codes.append(code)
    points, off = combine_rounds(rounds)
    code = next((c for c in codes if c != 0), 0)
    meta = {"model": (f"{source}" if args.model else "the project's random checkpoint in the exact Hub layout"
                      + (" (smoke dimensions)" if args.smoke else " (full size)")),
            "threads": threads, "precision": args.precision, "server_args": args.server_arg, "cores": os.cpu_count(),
            "loadavg": info["loadavg_at_start"],
            "loadavg_end": common.loadavg(), "rounds": args.rounds}
    md = markdown(points, off, meta)
    info["loadavg_at_end"] = meta["loadavg_end"]
    name = f"serve-{args.precision}"   # one results file per precision
    common.write_json(args.out / f"{name}.json", {
        "benchmark": "serve", "smoke": args.smoke, "machine": info, "model": meta["model"],
        "threads": threads, "precision": args.precision, "server_env": server_env, "server_args": args.server_arg,
        "server_exit_code": code, "offline": off, "points": points, "rounds": args.rounds,
        "results_by_round": [{"points": pts, "offline": o} for pts, o in rounds],
        "wall_s": time.perf_counter() - started})
    common.write_text(args.out / f"{name}.md", md)
    print(md)
    return 1 if code != 0 or any(p["errors"] for p in points) else 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
