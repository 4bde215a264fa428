"""Ray Serve: the server's /embed and /v1/embeddings (same JSON in and out as `ufcpu serve`) as a
deployment that Ray replicates across a cluster. Needs `pip install "ufcpu[ray-serve]"`.

    from ray import serve
    from ufcpu.integrations.ray_serve import UfcpuEmbeddings
    serve.run(UfcpuEmbeddings.options(num_replicas=4).bind(model="pbelcak/UltraFastBERT-1x11-long"))

Each replica loads the model once. Texts from concurrent requests are batched by `@serve.batch`
with a token budget (`max_batch_tokens`: the batch size counts tokens, not requests), sorted by
length and encoded packed, off the replica's event loop.
"""
from __future__ import annotations

import asyncio

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from .. import heads
from ..tokenizer import token_budget_batches
from ..errors import UfcpuError
from ..serve import jsonfloat, schema
from ..serve.app import DEFAULT_MODEL, error_response, finish, openai_body, token_ids
from ..tokenizer import pad


def _cpus() -> int:
    """CPUs Ray gave this replica (ray_actor_options num_cpus), at least 1."""
    try:
        import ray
        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:   # outside a Ray worker (local testing mode)
        return 1


@serve.deployment
class UfcpuEmbeddings:
    def __init__(self, model: str | None = None, threads: int | None = None, pooling: str = "mean",
                 max_batch_tokens: int = 4096, batch_wait_timeout_s: float = 0.002,
                 max_client_batch_size: int = 32, auto_truncate: bool = False, served_model_name: str | None = None):
        import ufcpu
        pooling = heads.pooling_name(pooling, ("mean", "first"))   # one vector per text
        self.model = ufcpu.load(model, threads=threads or _cpus())
        self.model.encode(["warm up the kernels"])
        self.pooling = pooling
        self.model_id = served_model_name or model or DEFAULT_MODEL
        c = self.model.config
        self.limits = schema.Limits(max_client_batch_size, c.max_seq, c.hidden, self.model.tokenizer.vocab_size,
                                    auto_truncate)
        self.max_batch_tokens = max_batch_tokens
        self._embed_one.set_max_batch_size(max_batch_tokens)
        self._embed_one.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.routes = {"/embed": self._embed, "/v1/embeddings": self._openai}

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        route = self.routes.get(path)
        if route is None or request.method != "POST":
            return error_response(path, 404, "Validation", f"no route POST {path} (routes: {', '.join(self.routes)})")
        try:
            text = await route(schema.parse_json(await request.body()))
            return Response(text.encode(), media_type="application/json")
        except schema.ApiError as e:
            return error_response(path, e.status, e.kind, e.message)
        except UfcpuError as e:
            return error_response(path, 422, "Validation", str(e).splitlines()[0])

    async def _vectors(self, ids: list[np.ndarray]) -> np.ndarray:  # -> [n, H]
        return np.stack(await asyncio.gather(*(self._embed_one(x) for x in ids)))

    async def _embed(self, body: dict) -> str:   # JSON text
        req = schema.embed(body, self.limits)
        if req.chunk_tokens is not None:
            vecs = await asyncio.to_thread(self.model.encode, req.texts, self.pooling, chunk_tokens=req.chunk_tokens,
                                           stride=req.stride)
        else:
            vecs = await self._vectors(token_ids(self.model, req.texts, req.truncate, req.left))
        return jsonfloat.matrix(finish(vecs, req.dimensions, req.normalize))

    async def _openai(self, body: dict) -> str:   # JSON text
        req = schema.openai_embed(body, self.limits)
        ids = ([np.asarray(s, np.int64) for s in req.ids] if req.ids is not None
               else token_ids(self.model, req.texts, self.limits.auto_truncate, False))
        vecs = finish(await self._vectors(ids), req.dimensions, True)
        return openai_body(vecs, req, sum(len(x) for x in ids), self.model_id)

    @serve.batch(max_batch_size=4096, batch_wait_timeout_s=0.002, batch_size_fn=lambda items: sum(map(len, items)))
    async def _embed_one(self, ids: list[np.ndarray]) -> list[np.ndarray]:
        """One text's ids per call; Ray hands over the calls that arrived together."""
        return await asyncio.to_thread(self._encode_ids, ids)

    def _encode_ids(self, ids: list[np.ndarray]) -> list[np.ndarray]:
        lengths = np.array([len(x) for x in ids])
        order = np.argsort(lengths, kind="stable")
        out: list = [None] * len(ids)
        for sl in token_budget_batches(lengths[order], self.max_batch_tokens):
            idx = order[sl]
            b = pad([ids[i] for i in idx], self.model.tokenizer.pad_id)
            h = self.model.hidden_states(b.input_ids, b.attention_mask)          # [B, S, H]
            for r, v in zip(idx, heads.POOLING[self.pooling](h, b.attention_mask)):
                out[r] = v
        return out
