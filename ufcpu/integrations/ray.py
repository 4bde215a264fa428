"""Ray Data batch inference: a callable class for `Dataset.map_batches`.

    import ray
    from ray.data import ActorPoolStrategy
    from ufcpu.integrations.ray import RayEncoder

    ds = ray.data.read_parquet("corpus/")
    ds = ds.map_batches(RayEncoder, fn_constructor_kwargs={"model": "pbelcak/UltraFastBERT-1x11-long"},
                        compute=ActorPoolStrategy(size=4), num_cpus=2, batch_size=256)
    ds.write_parquet("embeddings/")

Ray builds one RayEncoder per actor, so the model is loaded (and on a node's first actor,
downloaded and converted into that node's cache) once per actor and then reused for every batch.
The converted weights are memory-mapped, so the actors of one node share one copy in memory.
Each call adds an `embedding` column (float32 [H] per row) to the batch and keeps every other column.

Needs the `ray` extra: pip install "ufcpu[ray]" (ray[data] and pyarrow).
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

from ..errors import InputError

__all__ = ["RayEncoder"]


def _actor_cpus() -> int | None:
    """CPUs Ray assigned to this actor (map_batches(num_cpus=...), default 1); None outside Ray."""
    try:
        import ray
        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:   # not in a Ray worker, or an older Ray without this API
        return None
    return max(1, int(round(cpus))) if cpus else None


@contextlib.contextmanager
def _node_lock():
    """Actors starting together on one node load one at a time, so only the first downloads and
    converts the checkpoint into the node's cache; the others then map the converted files."""
    try:
        import fcntl
    except ImportError:   # pragma: no cover - not POSIX
        yield
        return
    from ..hub import cache_dir
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".load.lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _texts(column, name: str) -> list[str]:
    texts = column.tolist() if hasattr(column, "tolist") else (
        column.to_pylist() if hasattr(column, "to_pylist") else list(column))
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"column {name!r}, row {i} of the batch: expected a string, got "
                             f"{'null' if t is None else type(t).__name__}")
    return texts


class RayEncoder:
    """map_batches callable: encodes the `column` of each batch with one model per actor.

    model:     Hub id, Hub-layout folder or converted folder (default: pbelcak/UltraFastBERT-1x11-long);
               a path must exist on every node (or use a Hub id: each node caches its own copy).
    column:    the column holding the texts (strings).
    pooling:   "mean", "first", or "none" (a [n_i, H] array per row: each text's real tokens).
    normalize: L2-normalize each embedding.
    output_column: the column to add (default "embedding").
    batch_size: texts per forward pass inside a Ray batch (Ray's own batch_size says how many rows
               a call gets; the call sorts them by length and encodes them batch_size at a time).
    threads:   threads for BLAS and the kernels in this actor; default: the CPUs Ray assigned to the
               actor (map_batches(num_cpus=N)), so N actors x num_cpus never oversubscribe a node.
    """

    def __init__(self, model: str | os.PathLike | None = None, column: str = "text", pooling: str = "mean",
                 normalize: bool = False, output_column: str = "embedding", batch_size: int = 32,
                 threads: int | None = None, revision: str | None = None):
        import ufcpu
        from ..heads import pooling_name
        self.column = column
        self.pooling = pooling_name(pooling)
        self.normalize = normalize
        self.output_column = output_column
        self.batch_size = batch_size
        with _node_lock():
            self.model = ufcpu.load(model, revision=revision, threads=threads or _actor_cpus())

    def __repr__(self) -> str:
        return f"RayEncoder({self.model!r}, column={self.column!r}, pooling={self.pooling!r})"

    def _encode(self, texts: list[str]):
        if not texts:
            return np.zeros((0, self.model.config.hidden), np.float32)
        vecs = self.model.encode(texts, self.pooling, self.normalize, self.batch_size)
        if self.pooling == "none":      # ragged: an object array of [n_i, H] arrays
            out = np.empty(len(vecs), dtype=object)
            out[:] = vecs
            return out
        return vecs

    def __call__(self, batch):
        """batch: a dict of NumPy arrays (Ray's default), a pandas DataFrame or a pyarrow Table;
        -> the same kind, with `output_column` added."""
        if isinstance(batch, dict):
            if self.column not in batch:
                raise InputError(f"no column {self.column!r} in the batch (columns: {', '.join(map(repr, batch))}); "
                                 f"pass column=...")
            out = dict(batch)
            out[self.output_column] = self._encode(_texts(batch[self.column], self.column))
            return out
        names = list(getattr(batch, "column_names", None) or getattr(batch, "columns", []))
        if self.column not in names:
            raise InputError(f"no column {self.column!r} in the batch (columns: {', '.join(map(repr, names))}); "
                             f"pass column=...")
        vecs = self._encode(_texts(batch[self.column], self.column))
        if hasattr(batch, "append_column"):          # pyarrow.Table
            import pyarrow as pa
            if self.pooling == "none":
                arr = pa.array([v.tolist() for v in vecs], pa.list_(pa.list_(pa.float32())))
            else:
                h = self.model.config.hidden
                arr = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(vecs).reshape(-1)), h)
            if self.output_column in names:
                batch = batch.drop_columns([self.output_column])
            return batch.append_column(self.output_column, arr)
        out = batch.copy()                           # pandas.DataFrame
        out[self.output_column] = list(vecs)
        return out
