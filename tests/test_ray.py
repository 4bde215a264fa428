"""ufcpu.integrations.ray.RayEncoder on a local Ray runtime (ray.init(num_cpus=2)), and the
README's example script (examples/ray_encode_parquet.py) on a parquet folder. Skipped unless the
`ray` extra is installed: pip install -e ".[test,ray]"."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, load_fixture

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from ray.data import ActorPoolStrategy  # noqa: E402

from ufcpu.errors import InputError  # noqa: E402
from ufcpu.integrations.ray import RayEncoder  # noqa: E402

# Ray Data's own configuration warns about its deprecated options while it starts; not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MODEL = str(DATA / "tiny-ufb")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ray_encode_parquet.py"


def texts_for(n: int, start: int = 0) -> list[str]:
    words = "the quick brown fox jumps over a lazy dog and walks the tree".split()
    return [f"{i} " + " ".join(words[: 1 + (i * 7) % len(words)]) for i in range(start, start + n)]


@pytest.fixture(scope="module")
def local_ray():
    load_fixture("tiny-ufb")     # convert once into the session cache; the actors inherit UFCPU_CACHE
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def test_map_batches_matches_encode(local_ray):
    texts = texts_for(300)
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    out = ds.map_batches(RayEncoder, fn_constructor_kwargs={"model": MODEL},
                         compute=ActorPoolStrategy(min_size=1, max_size=2), batch_size=64).take_all()
    out.sort(key=lambda r: r["id"])
    assert [r["text"] for r in out] == texts                       # every other column kept
    got = np.stack([r["embedding"] for r in out])
    assert got.dtype == np.float32 and got.shape == (300, 128)
    np.testing.assert_allclose(got, load_fixture("tiny-ufb").encode(texts), atol=1e-5)


def _load_example():
    spec = importlib.util.spec_from_file_location("ray_encode_parquet", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_example_parquet_folder(local_ray, tmp_path):
    src, dst = tmp_path / "corpus", tmp_path / "embeddings"
    src.mkdir()
    texts = texts_for(240)
    for k in range(3):
        rows = range(80 * k, 80 * (k + 1))
        pq.write_table(pa.table({"id": list(rows), "text": [texts[i] for i in rows]}), src / f"part-{k}.parquet")
    _load_example().encode_parquet(str(src), str(dst), model=MODEL, actors=2, threads=1, batch_size=50,
                                   normalize=True)
    table = pq.read_table(dst)                         # read back without Ray's tensor type
    assert set(table.column_names) == {"id", "text", "embedding"} and table.num_rows == 240
    order = np.argsort(table.column("id").to_numpy())
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))[order].astype(np.float32)
    np.testing.assert_allclose(got, load_fixture("tiny-ufb").encode(texts, normalize=True), atol=1e-5)


# --- the callable itself, without the runtime: every batch format Ray can hand it -----------------

@pytest.fixture(scope="module")
def encoder():
    return RayEncoder(model=MODEL, threads=2)


def test_batch_formats(encoder):
    texts = texts_for(5)
    ref = load_fixture("tiny-ufb").encode(texts)
    out = encoder({"text": np.array(texts, dtype=object), "id": np.arange(5)})
    assert set(out) == {"text", "id", "embedding"}
    np.testing.assert_allclose(out["embedding"], ref, atol=1e-5)

    import pandas as pd
    df = encoder(pd.DataFrame({"text": texts}))
    np.testing.assert_allclose(np.stack(df["embedding"].to_list()), ref, atol=1e-5)

    table = encoder(pa.table({"text": texts}))
    assert table.column_names == ["text", "embedding"]
    np.testing.assert_allclose(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), ref, atol=1e-5)

    empty = encoder({"text": np.array([], dtype=object)})
    assert empty["embedding"].shape == (0, 128)


def test_pooling_none_gives_token_vectors():
    enc = RayEncoder(model=MODEL, pooling="none", output_column="tokens", threads=2)
    out = enc({"text": np.array(["one two three", "four"], dtype=object)})
    ref = load_fixture("tiny-ufb").encode(["one two three", "four"], pooling="none")
    for got, want in zip(out["tokens"], ref):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_bad_batches_are_named(encoder):
    with pytest.raises(InputError, match=r"no column 'text'.*'body'"):
        encoder({"body": np.array(["a"], dtype=object)})
    with pytest.raises(InputError, match=r"column 'text', row 1 of the batch: expected a string, got null"):
        encoder({"text": np.array(["a", None], dtype=object)})
    with pytest.raises(InputError, match="pooling"):
        RayEncoder(model=MODEL, pooling="max")
