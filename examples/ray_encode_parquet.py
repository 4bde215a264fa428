"""Encode a folder of parquet files with Ray Data and N ufcpu actors; write the result as parquet.

    pip install -e ".[ray]"
    python examples/ray_encode_parquet.py corpus/ embeddings/ --actors 2 --threads 1

Every output row is an input row (all its columns) plus `embedding` (float32 [H]; pyarrow and
pandas without Ray read it as a list of floats). Ray Data does not keep row order across files and
blocks by default, so keep an id column to join on.

On a cluster, run the same script there (ufcpu must be installed on every node):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python examples/ray_encode_parquet.py s3://bucket/corpus/ s3://bucket/embeddings/ --actors 16 --threads 4

ray.init() joins the cluster the job runs on (or RAY_ADDRESS); with no cluster it starts a
local one. Each node downloads and converts the model once into its own cache, and the actors on
that node memory-map the same converted files.
"""
from __future__ import annotations

import argparse


def encode_parquet(src: str, dst: str, model: str | None = None, column: str = "text",
                   actors: int = 2, threads: int = 1, batch_size: int = 256, pooling: str = "mean",
                   normalize: bool = False) -> None:
    """src: a parquet file or folder (any path Ray reads: local, s3://, gs://, ...) -> dst folder."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from ufcpu.integrations.ray import RayEncoder

    ds = ray.data.read_parquet(src)
    ds = ds.map_batches(
        RayEncoder,
        fn_constructor_kwargs={"model": model, "column": column, "pooling": pooling, "normalize": normalize},
        # Up to N actors, each loading the model once. A pool that starts at 1 and grows as CPUs
        # allow never takes the CPUs Ray's read and write tasks need (a fixed pool of actors that
        # takes every CPU of the cluster stalls before reading a file).
        compute=ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=threads,                          # per actor; RayEncoder runs that many threads
        batch_size=batch_size,                     # rows per call (sorted by length inside it)
    )
    ds.write_parquet(dst)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="parquet file or folder with a text column")
    p.add_argument("dst", help="output folder (parquet)")
    p.add_argument("--model", default=None, help="Hub id or folder (default: pbelcak/UltraFastBERT-1x11-long)")
    p.add_argument("--column", default="text")
    p.add_argument("--actors", type=int, default=2, help="model replicas (actors) in the pool")
    p.add_argument("--threads", type=int, default=1, help="CPUs and threads per actor")
    p.add_argument("--batch-size", type=int, default=256, help="rows per map_batches call")
    p.add_argument("--pooling", choices=("mean", "first"), default="mean")
    p.add_argument("--normalize", action="store_true")
    args = p.parse_args(argv)

    import ray
    ray.init()    # the cluster this runs on (ray job submit / RAY_ADDRESS), else a local one
    try:
        encode_parquet(args.src, args.dst, args.model, args.column, args.actors, args.threads,
                       args.batch_size, args.pooling, args.normalize)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
