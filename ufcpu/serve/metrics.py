"""Prometheus text exposition without a client library: counters, gauges and histograms updated
from the event loop and the model thread (one lock)."""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

# name -> (type, help, buckets or None)
METRICS = {
    "ufcpu_requests_total": ("counter", "HTTP requests by route and status", None),
    "ufcpu_inputs_total": ("counter", "inputs (texts or token sequences) received by route", None),
    "ufcpu_tokens_total": ("counter", "tokens run through the model", None),
    "ufcpu_queue_depth": ("gauge", "requests waiting for the model thread", None),
    "ufcpu_requests_in_flight": ("gauge", "requests being served", None),
    "ufcpu_batch_inputs": ("histogram", "inputs per model batch", SIZE_BUCKETS),
    "ufcpu_batch_tokens": ("histogram", "tokens per model batch", TOKEN_BUCKETS),
    "ufcpu_request_duration_seconds": ("histogram", "request latency by route", LATENCY_BUCKETS),
    "ufcpu_queue_seconds": ("histogram", "time a request waited for the model thread", LATENCY_BUCKETS),
    "ufcpu_compute_seconds": ("histogram", "model time of the batch a request ran in", LATENCY_BUCKETS),
}


def _labels(labels: tuple) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict = defaultdict(float)          # (name, labels) -> value
        self._hist: dict = {}                             # (name, labels) -> [counts per bucket, sum, count]

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] += value

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] = value

    def observe(self, name: str, value: float, **labels) -> None:
        buckets = METRICS[name][2]
        with self._lock:
            h = self._hist.setdefault((name, tuple(sorted(labels.items()))), [[0] * len(buckets), 0.0, 0])
            i = bisect.bisect_left(buckets, value)
            if i < len(buckets):
                h[0][i] += 1
            h[1] += value
            h[2] += 1

    def render(self) -> str:
        with self._lock:
            values, hist = dict(self._values), {k: (list(v[0]), v[1], v[2]) for k, v in self._hist.items()}
        out = []
        for name, (kind, help_, buckets) in METRICS.items():
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            for (n, labels), v in sorted(values.items()):
                if n == name:
                    out.append(f"{name}{_labels(labels)} {v:g}")
            for (n, labels), (counts, total, count) in sorted(hist.items()):
                if n != name:
                    continue
                cum = 0
                for b, c in zip(buckets, counts):
                    cum += c
                    out.append(f"{name}_bucket{_labels(labels + (('le', f'{b:g}'),))} {cum}")
                out.append(f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} {count}")
                out.append(f"{name}_sum{_labels(labels)} {total:g}")
                out.append(f"{name}_count{_labels(labels)} {count}")
        return "\n".join(out) + "\n"
