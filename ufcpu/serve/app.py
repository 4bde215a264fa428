"""The HTTP server: TEI's routes and shapes, OpenAI's /v1/embeddings, Prometheus /metrics.

Handlers parse (schema.py), tokenize in a worker thread, and await the model thread
(batcher.py); the event loop itself never runs model code. The Gate in front of every route
does admission (429 at once past --max-concurrent-requests: the queue is bounded by it), the API
key, the payload limit, 503 while loading or stopping, the per-request log line and metrics.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from typing import Any, Awaitable, Callable

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .. import heads
from .. import settings as ufcpu_settings
from ..chunking import piece_tokenizer
from ..errors import UfcpuError
from . import jsonfloat, schema
from .batcher import Done, Worker
from .metrics import Metrics
from .schema import ApiError, invalid

log = logging.getLogger("ufcpu.serve")
DEFAULT_MODEL = "pbelcak/UltraFastBERT-1x11-long"
UNGATED = ("/health", "/metrics")
# Longer than clients' pools keep idle connections: a server closing one as a client reuses it
# fails that request (uvicorn's default is 5 s).
KEEP_ALIVE_S = 75      # probes and scrapes are never refused for load
# The model thread takes the GIL back between kernels; with Python's 5 ms a busy event loop can
# hold it that long each time while the cores idle (bench/README.md, "Serving").
SWITCH_INTERVAL_S = 0.0005
# Under load the batches come a round trip apart (answers written, the next requests read: about
# 10 ms), longer than a library call's 2 ms spin: a helper that went to sleep between them took
# the GIL to wake up and joined the next batch late (16 clients: 1.09x texts/s, bench/README.md,
# "Serving"). Idle, the helpers sleep 20 ms after the last batch. UFCPU_SPIN_US still decides.
SERVE_SPIN_US = 20000


def tune_process() -> None:
    """What a process that is the server's own sets for itself: the GIL's switch interval and
    the helpers' spin."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    ufcpu_settings.use_helper_spin_default(SERVE_SPIN_US)


@dataclasses.dataclass
class Settings:
    model: str | None = None
    revision: str | None = None
    threads: int | None = None
    check: bool = False
    precision: str = "float32"
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch_tokens: int = 4096
    max_concurrent_requests: int = 512
    max_client_batch_size: int = 32
    payload_limit: int = 2_000_000
    max_wait_ms: float = 2.0
    return_wait_ms: float = 50.0
    api_key: str | None = None
    auto_truncate: bool = False
    pooling: str = "mean"
    served_model_name: str | None = None

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model or DEFAULT_MODEL


class State:
    def __init__(self, settings: Settings, load: Callable[[], Any]):
        self.settings = settings
        self.metrics = Metrics()
        self.worker = Worker(load, settings.max_batch_tokens, self.metrics, settings.max_wait_ms / 1000,
                             settings.return_wait_ms / 1000)
        self.in_flight = 0
        self.stopping = False
        self.exit_code = 0
        self._limits: schema.Limits | None = None

    @property
    def model(self):
        if not self.worker.ready.is_set():
            raise ApiError(503, "Unhealthy", f"the model is not loaded: {self.worker.failed}" if self.worker.failed
                           else "the model is loading")
        return self.worker.model

    @property
    def limits(self) -> schema.Limits:
        if self._limits is None:
            c, s = self.model.config, self.settings
            self._limits = schema.Limits(s.max_client_batch_size, c.max_seq, c.hidden,
                                         self.model.tokenizer.vocab_size, s.auto_truncate)
        return self._limits


# --- responses ------------------------------------------------------------------------------------

def error_response(path: str, status: int, kind: str, message: str) -> JSONResponse:
    if path.startswith("/v1/"):
        body = {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "invalid_request_error"),
                          "param": None, "code": None}}
    else:
        body = {"error": message, "error_type": kind}
    return JSONResponse(body, status_code=status)


_OPENAI_TYPES = {401: "authentication_error", 429: "rate_limit_exceeded", 503: "server_error", 500: "server_error"}


def _ms(s: float) -> str:
    return f"{s * 1000:.3f}"


# --- the gate -------------------------------------------------------------------------------------

class Gate:
    """ASGI middleware in front of every route (see the module docstring)."""

    def __init__(self, app, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st, path = self.state, scope["path"]
        t0 = time.perf_counter()
        note = scope["ufcpu"] = {"inputs": 0, "tokens": 0, "queue_s": 0.0, "compute_s": 0.0,
                                 "t0": t0, "last": t0, "phases": []}
        status = [499]   # what is logged when the client went away before any answer

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        refusal = self._refusal(scope, path)
        route = path if path in ROUTE_NAMES else "other"
        if refusal is not None:
            await error_response(path, *refusal)(scope, receive, send_status)
        elif path in UNGATED:
            await self.app(scope, receive, send_status)
        else:
            st.in_flight += 1
            st.metrics.set("ufcpu_requests_in_flight", st.in_flight)
            note["arriving"] = route in MODEL_ROUTES   # the model thread may wait for its job (batcher.py)
            if note["arriving"]:
                st.worker.arriving(+1)
            try:
                await self.app(scope, receive, send_status)
            finally:
                st.in_flight -= 1
                st.metrics.set("ufcpu_requests_in_flight", st.in_flight)
                if note["arriving"]:   # it left without queueing a job
                    st.worker.arriving(-1)
        total = time.perf_counter() - t0
        st.metrics.inc("ufcpu_requests_total", route=route, status=status[0])
        st.metrics.observe("ufcpu_request_duration_seconds", total, route=route)
        if route in MODEL_ROUTES and status[0] < 300:
            st.metrics.inc("ufcpu_inputs_total", note["inputs"], route=route)
            st.metrics.observe("ufcpu_queue_seconds", note["queue_s"])
            st.metrics.observe("ufcpu_compute_seconds", note["compute_s"])
        if path not in UNGATED:
            log.info("%s %s %d inputs=%d tokens=%d queue_ms=%.1f compute_ms=%.1f total_ms=%.1f",
                     scope["method"], path, status[0], note["inputs"], note["tokens"], note["queue_s"] * 1000,
                     note["compute_s"] * 1000, total * 1000)

    def _refusal(self, scope, path: str) -> tuple[int, str, str] | None:
        st, s = self.state, self.state.settings
        if path in UNGATED:
            return None
        if st.stopping:
            return 503, "Unhealthy", "the server is shutting down"
        if st.in_flight >= s.max_concurrent_requests:
            return 429, "Overloaded", f"model is overloaded: more than {s.max_concurrent_requests} requests in flight"
        headers = dict(scope["headers"])
        if s.api_key is not None and headers.get(b"authorization", b"") != f"Bearer {s.api_key}".encode():
            return 401, "Unauthorized", "missing or wrong API key: send the header 'Authorization: Bearer KEY'"
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return 400, "Validation", "the Content-Length header is not a number"
        if int(length) > s.payload_limit:
            return 413, "Validation", f"the body is {int(length)} bytes; the limit is {s.payload_limit}"
        return None


# --- handlers -------------------------------------------------------------------------------------

def endpoint(fn: Callable[[Request, State], Awaitable[Response]], state: State):
    """A route's handler with its errors turned into JSON: ApiError and ufcpu's input errors are
    the client's (4xx, no traceback); anything else is a bug in the server (500, logged)."""
    async def handle(request: Request) -> Response:
        try:
            return await fn(request, state)
        except ApiError as e:
            return error_response(request.url.path, e.status, e.kind, e.message)
        except UfcpuError as e:
            return error_response(request.url.path, 422, "Validation", str(e).splitlines()[0])
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(request.url.path, 500, "Backend", "internal server error")
    return handle


async def read_json(request: Request, state: State) -> dict:
    limit, chunks, n = state.settings.payload_limit, [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ApiError(413, "Validation", f"the body is more than {limit} bytes")
        chunks.append(chunk)
    return schema.parse_json(b"".join(chunks))


def arrived(request: Request) -> bool:
    """Whether the request still counts as arriving; its job, queued now, settles that."""
    note = request.scope["ufcpu"]
    was, note["arriving"] = note.get("arriving", False), False
    return was


def peer(request: Request):
    """The client's connection, (host, port): its next request on it is likely soon (batcher.py)."""
    client = request.scope.get("client")
    return tuple(client) if client else None


def mark(request: Request, phase: str) -> None:
    """End one phase of the request's Server-Timing: the time since the previous mark."""
    note, now = request.scope["ufcpu"], time.perf_counter()
    note["phases"].append((phase, now - note["last"]))
    note["last"] = now


def timed(request: Request, done: Done, inputs: int, tokens: int) -> dict:
    """TEI's timing headers; the model thread's phases (queue, compute, and wake: from the batch's
    end until this handler ran again) go into Server-Timing."""
    note, now = request.scope["ufcpu"], time.perf_counter()
    note.update(inputs=inputs, tokens=tokens, queue_s=done.queue_s, compute_s=done.compute_s)
    note["phases"] += [("queue", done.queue_s), ("compute", done.compute_s), ("wake", now - done.end)]
    note["last"] = now
    return {"x-queue-time": _ms(done.queue_s), "x-inference-time": _ms(done.compute_s),
            "x-compute-time": _ms(done.queue_s + done.compute_s)}


def reply(request: Request, body: Any, headers: dict) -> Response:
    """A JSON answer (a str is JSON text already) with the request's phases as a Server-Timing
    header (W3C; ms): read, tokenize, queue, compute, wake, encode, and total since arrival."""
    text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False, allow_nan=False,
                                                         separators=(",", ":"))
    mark(request, "encode")
    note = request.scope["ufcpu"]
    phases = note["phases"] + [("total", note["last"] - note["t0"])]
    headers["server-timing"] = ", ".join(f"{name};dur={_ms(s)}" for name, s in phases)
    return Response(text.encode("utf-8"), headers=headers, media_type="application/json")


def token_ids(model, texts: list[str], truncate: bool, left: bool) -> list[np.ndarray]:
    """Texts -> ids as model.encode tokenizes them; a text past max_seq tokens is an error unless
    truncate, and with left, keeps its last tokens (and the special tokens)."""
    ids, report = model.tokenizer.encode_ids(texts)
    cut = report.truncated
    if cut and not truncate:
        raise invalid(f"`inputs`[{cut[0]}] is longer than {model.config.max_seq} tokens: send "
                      "\"truncate\": true to cut it, or \"chunk_tokens\" to average windows over all of it")
    if left and cut:
        tok = piece_tokenizer(str(model.tokenizer.path))
        keep = model.config.max_seq - tok.n_special
        for i in cut:
            ids[i] = tok.wrap(np.concatenate(list(tok.content_ids(texts[i])))[-keep:])
    return ids


INLINE_CHARS = 8192   # tokenizing this much takes well under a millisecond: not worth a thread handoff


async def off_loop(chars: int, fn, *args):
    """fn(*args) in a worker thread, or inline for short texts (each handoff to another thread
    costs a scheduler wake-up, which is most of a short request's latency on a busy machine)."""
    return fn(*args) if chars <= INLINE_CHARS else await run_in_threadpool(fn, *args)


def finish(vecs: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:  # [n, H] -> [n, d]
    if dimensions is not None:
        vecs = vecs[:, :dimensions]
    return heads.l2_normalize(vecs) if normalize else vecs


async def _embed(request: Request, st: State, pooling: str) -> tuple[Any, dict]:
    model, req = st.model, schema.embed(await read_json(request, st), st.limits, normalize=pooling != "none")
    mark(request, "read")
    if req.chunk_tokens is not None:
        if pooling == "none":
            raise invalid("`chunk_tokens` applies to /embed, not to per-token /embed_all")
        done = await st.worker.call(lambda m: m.encode(req.texts, pooling, chunk_tokens=req.chunk_tokens,
                                                       stride=req.stride), arrived(request))
        return finish(done.value, req.dimensions, req.normalize), timed(request, done, len(req.texts), 0)
    ids = await off_loop(sum(map(len, req.texts)), token_ids, model, req.texts, req.truncate, req.left)
    mark(request, "tokenize")
    done = await st.worker.embed(ids, pooling, arrived(request), peer(request))
    headers = timed(request, done, len(ids), sum(len(x) for x in ids))
    if pooling == "none":
        return [finish(v, req.dimensions, req.normalize) for v in done.value], headers
    return finish(np.stack(done.value), req.dimensions, req.normalize), headers


async def embed(request: Request, st: State) -> Response:
    vecs, headers = await _embed(request, st, st.settings.pooling)
    return reply(request, jsonfloat.matrix(vecs), headers)


async def embed_all(request: Request, st: State) -> Response:
    vecs, headers = await _embed(request, st, "none")
    return reply(request, jsonfloat.matrices(vecs), headers)


async def openai_embeddings(request: Request, st: State) -> Response:
    model, req = st.model, schema.openai_embed(await read_json(request, st), st.limits)
    mark(request, "read")
    ids = ([np.asarray(s, np.int64) for s in req.ids] if req.ids is not None else
           await off_loop(sum(map(len, req.texts)), token_ids, model, req.texts, st.settings.auto_truncate, False))
    mark(request, "tokenize")
    done = await st.worker.embed(ids, st.settings.pooling, arrived(request), peer(request))
    vecs = finish(np.stack(done.value), req.dimensions, True)
    tokens = sum(len(x) for x in ids)
    headers = timed(request, done, len(ids), tokens)
    return reply(request, openai_body(vecs, req, tokens, st.settings.model_id), headers)


def openai_body(vecs: np.ndarray, req: schema.OpenAIEmbed, tokens: int, model_id: str) -> str:
    """OpenAI's embeddings answer as JSON text; base64 is the little-endian float32 bytes of each
    vector."""
    as_b64 = lambda v: json.dumps(base64.b64encode(v.astype("<f4").tobytes()).decode("ascii"))  # noqa: E731
    vec = as_b64 if req.base64 else jsonfloat.vector
    data = ",".join(f'{{"object":"embedding","index":{i},"embedding":{vec(v)}}}' for i, v in enumerate(vecs))
    tail = json.dumps({"model": req.model or model_id, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                      ensure_ascii=False, separators=(",", ":"))
    return f'{{"object":"list","data":[{data}],{tail[1:]}'



def _need(model, task: str, route: str) -> None:
    if model.config.task != task:
        raise invalid(f"{route} needs a {task} checkpoint; this server runs a {model.config.task} checkpoint")


async def predict(request: Request, st: State) -> Response:
    model, body = st.model, await read_json(request, st)
    _need(model, "classification", "/predict")
    items, single, raw = schema.predict(body, st.limits)
    done = await st.worker.call(lambda m: m.classify(items), arrived(request))
    logits = np.atleast_2d(done.value)                                  # [n, C]
    scores = logits if raw else heads.probabilities(logits)
    names = model.config.id2label or tuple(f"LABEL_{i}" for i in range(logits.shape[1]))
    out = [sorted(({"score": float(s), "label": names[c]} for c, s in enumerate(row)),
                  key=lambda d: -d["score"]) for row in scores]
    return reply(request, out[0] if single else out, timed(request, done, len(items), 0))


async def fill_mask(request: Request, st: State) -> Response:
    model, body = st.model, await read_json(request, st)
    _need(model, "mlm", "/fill-mask")
    text, top_k = schema.fill_mask(body, st.limits)
    done = await st.worker.call(lambda m: m.fill_mask(text, top_k=top_k), arrived(request))
    return reply(request, done.value, timed(request, done, 1, 0))


async def tokenize(request: Request, st: State) -> Response:
    model, body = st.model, await read_json(request, st)
    items, special = schema.tokenize(body, st.limits)
    tok = piece_tokenizer(str(model.tokenizer.path))
    out = await run_in_threadpool(lambda: [tok.encode_detail(t, model.config.max_seq, special) for t in items])
    request.scope["ufcpu"].update(inputs=len(items), tokens=sum(map(len, out)))
    return JSONResponse(out)


async def decode(request: Request, st: State) -> Response:
    model, body = st.model, await read_json(request, st)
    seqs, skip = schema.decode(body, st.limits)
    tok = piece_tokenizer(str(model.tokenizer.path))
    return JSONResponse([tok.decode(s, skip) for s in seqs])


async def info(request: Request, st: State) -> Response:
    s = st.settings
    body = {"model_id": s.model_id, "model_sha": None, "model_dtype": s.precision, "precision": s.precision,
            "max_concurrent_requests": s.max_concurrent_requests, "max_batch_tokens": s.max_batch_tokens,
            "max_batch_requests": None, "max_client_batch_size": s.max_client_batch_size,
            "auto_truncate": s.auto_truncate, "tokenization_workers": None, "version": _version()}
    if st.worker.ready.is_set():
        c = st.worker.model.config
        body["max_input_length"] = c.max_seq
        body["model_type"] = ({"classifier": {"id2label": dict(enumerate(
            c.id2label or [f"LABEL_{i}" for i in range(c.num_labels)]))}} if c.task == "classification"
            else {"embedding": {"pooling": s.pooling}})
    return JSONResponse(body)


async def models(request: Request, st: State) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": st.settings.model_id, "object": "model",
                                                     "created": 0, "owned_by": "ufcpu"}]})


async def health(request: Request, st: State) -> Response:
    if st.stopping:
        raise ApiError(503, "Unhealthy", "the server is shutting down")
    st.model   # raises 503 while loading
    return Response(status_code=200)


async def metrics(request: Request, st: State) -> Response:
    st.metrics.set("ufcpu_queue_depth", st.worker.depth())
    return PlainTextResponse(st.metrics.render(), media_type="text/plain; version=0.0.4")


def _version() -> str:
    from .. import __version__
    return __version__


# route -> (methods, handler); MODEL_ROUTES run the model
ROUTES = {
    "/embed": (["POST"], embed), "/embed_all": (["POST"], embed_all), "/predict": (["POST"], predict),
    "/fill-mask": (["POST"], fill_mask), "/tokenize": (["POST"], tokenize), "/decode": (["POST"], decode),
    "/v1/embeddings": (["POST"], openai_embeddings), "/v1/models": (["GET"], models),
    "/info": (["GET"], info), "/health": (["GET"], health), "/metrics": (["GET"], metrics),
}
ROUTE_NAMES = frozenset(ROUTES)
MODEL_ROUTES = frozenset(("/embed", "/embed_all", "/predict", "/fill-mask", "/v1/embeddings"))


def build_app(settings: Settings, load: Callable[[], Any] | None = None) -> tuple[Any, State]:
    if load is None:
        from .. import load as load_model
        load = lambda: load_model(settings.model, revision=settings.revision,   # noqa: E731
                                  threads=settings.threads, check=settings.check, precision=settings.precision)
    state = State(settings, load)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.worker.start()
        yield
        await run_in_threadpool(state.worker.stop)   # after uvicorn has answered every request in flight

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(request.url.path, exc.status_code, "Validation", str(exc.detail))

    routes = [Route(path, endpoint(fn, state), methods=methods) for path, (methods, fn) in ROUTES.items()]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    return Gate(app, state), state


class Server(uvicorn.Server):
    """uvicorn, where SIGTERM and SIGINT mean: stop accepting, answer what is in flight, exit 0
    (uvicorn itself re-raises the signal after its graceful shutdown)."""

    def __init__(self, config: uvicorn.Config, state: State):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        self.state.stopping = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT -> exit code (2 when the model cannot be loaded)."""
    app, state = build_app(settings)
    tune_process()   # this process is the server's own
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=None,
                            timeout_keep_alive=KEEP_ALIVE_S)
    server = Server(config, state)

    def failed(message: str) -> None:
        log.error("cannot load the model: %s", message)
        state.exit_code = 2
        server.should_exit = True
    state.worker.on_failure = failed
    log.info("serving %s on http://%s:%d (loading the model; /health answers 200 once it is ready)",
             settings.model_id, settings.host, settings.port)
    server.run()
    return state.exit_code
