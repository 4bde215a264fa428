"""`ufcpu` command line: argument parsing and printing only; the math lives in the library.

Errors (bad arguments, bad input, bad checkpoints) exit with code 2 and one line on stderr.
Results go to stdout (or -o); logs, warnings and progress go to stderr.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
from typing import Iterable, Iterator

import numpy as np

from .errors import UfcpuError

EXIT_USAGE = 2
log = logging.getLogger("ufcpu")


class _Parser(argparse.ArgumentParser):
    """argparse prints the whole usage on an error; we print one line naming the problem."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="Hub id, Hub-layout folder or converted folder (default: pbelcak/UltraFastBERT-1x11-long)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--threads", type=positive_int, default=None, help="threads for BLAS and the kernels (default: all cores)")
    p.add_argument("--check", action="store_true", help="scan every weight for NaN/inf at load")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ufcpu", description="Torch-free CPU inference for UltraFastBERT (fast feedforward for real).")
    p.add_argument("--version", action="version", version=f"ufcpu {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    e = sub.add_parser("encode", help="sentence embeddings, from arguments, stdin (one text per line) or --input FILE")
    _model_args(e)
    e.add_argument("texts", nargs="*", metavar="TEXT", help="texts to encode (default: one per line on stdin)")
    e.add_argument("--pooling", choices=("mean", "first", "none"), default="mean")
    e.add_argument("--normalize", action="store_true", help="L2-normalize each embedding")
    e.add_argument("--format", choices=("json", "jsonl", "npy"), default=None,
                   help="output format (default json; with --input the output's suffix sets it)")
    e.add_argument("-o", "--output", default=None,
                   help="output file (required for npy and with --input: .npy, .jsonl or .parquet; default stdout)")
    e.add_argument("--batch-size", type=positive_int, default=32)
    e.add_argument("--input", "-i", default=None, metavar="FILE",
                   help="encode a corpus file: .txt (one text per line), .jsonl or .parquet; streamed, bounded memory")
    e.add_argument("--field", default=None, help="with --input: the .jsonl field or .parquet column holding the text (default: text)")
    e.add_argument("--resume", action="store_true", help="with --input: continue an interrupted run, appending to -o")
    e.add_argument("--window", type=positive_int, default=1024,
                   help="texts read at a time and sorted by length into batches (default 1024)")
    e.add_argument("--chunk-tokens", type=positive_int, default=None, metavar="N",
                   help="long texts as overlapping windows of N tokens, averaged by token count (default: cut at 128)")
    e.add_argument("--stride", type=int, default=None, metavar="M", help="with --chunk-tokens: tokens a window shares with the one before (default 0)")

    f = sub.add_parser("fill-mask", help="predict the <mask> (or [MASK]) token(s) of a text")
    _model_args(f)
    f.add_argument("text", metavar="TEXT")
    f.add_argument("--top-k", type=positive_int, default=5)

    c = sub.add_parser("classify", help="run a fine-tuned sequence classifier")
    _model_args(c)
    c.add_argument("texts", nargs="*", metavar="TEXT", help="texts (default: one per line on stdin)")
    c.add_argument("--pair", action="store_true", help="each text is a pair 'A<TAB>B'")
    c.add_argument("--format", choices=("json", "jsonl"), default="json")
    c.add_argument("--batch-size", type=positive_int, default=32)

    v = sub.add_parser("convert", help="write the engine layout of a Hub-layout checkpoint")
    v.add_argument("src", help="Hub id or Hub-layout folder")
    v.add_argument("dst", help="folder to write (created; replaced if it is an engine folder)")
    v.add_argument("--revision", default=None)

    i = sub.add_parser("info", help="config, files, cache paths and threads")
    _model_args(i)

    s = sub.add_parser("serve", help="HTTP server: TEI routes (/embed, ...) and OpenAI /v1/embeddings (needs ufcpu[server])")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    s.add_argument("--port", type=positive_int, default=8080)
    s.add_argument("--max-batch-tokens", type=positive_int, default=4096, help="tokens per model batch (default 4096)")
    s.add_argument("--max-concurrent-requests", type=positive_int, default=512, help="requests in flight before 429 (default 512)")
    s.add_argument("--max-client-batch-size", type=positive_int, default=32, help="inputs per request before 413 (default 32)")
    s.add_argument("--payload-limit", type=positive_int, default=2_000_000, help="body bytes before 413 (default 2000000)")
    s.add_argument("--max-wait-ms", type=float, default=2.0, help="wait after a lone request for others to batch with (default 2)")
    s.add_argument("--api-key", default=os.environ.get("UFCPU_API_KEY"), help="require 'Authorization: Bearer KEY' (default $UFCPU_API_KEY)")
    s.add_argument("--auto-truncate", action="store_true", help="cut inputs past 128 tokens instead of answering 422")
    s.add_argument("--pooling", choices=("mean", "first"), default="mean")
    s.add_argument("--served-model-name", default=None, help="model id in /info and OpenAI answers (default: --model)")

    w = sub.add_parser("warmup", help="compile the kernels and store them in Numba's cache")
    w.add_argument("--model", "-m", default=None, help="also run one forward pass of this model")
    return p


def _version() -> str:
    from . import __version__
    return __version__


# --- input ----------------------------------------------------------------------------------------

def stdin_lines() -> Iterator[str]:
    """stdin, one text per line, streamed; undecodable bytes are replaced (with one warning)."""
    warned = False
    for raw in sys.stdin.buffer:
        line = raw.rstrip(b"\r\n")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", errors="replace")
            if not warned:
                log.warning("stdin is not valid UTF-8: undecodable bytes were replaced by U+FFFD")
                warned = True
        yield text


def _texts(args) -> Iterable[str]:
    if args.texts:
        return args.texts
    if sys.stdin is None or sys.stdin.isatty():
        raise UfcpuError("no TEXT given and nothing on stdin")
    return stdin_lines()


def _progress(it: Iterable, unit: str):
    """A progress bar on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return it
    from tqdm import tqdm
    return tqdm(it, unit=unit, file=sys.stderr)


# --- commands -------------------------------------------------------------------------------------

def _load(args, **kw):
    from . import load
    return load(args.model, revision=args.revision, threads=args.threads, check=args.check, **kw)


def _as_json(a: np.ndarray) -> list:
    return a.tolist()


def _vectors(model, texts: Iterable[str], args) -> Iterator[np.ndarray]:
    if args.chunk_tokens is None:
        return model.encode_iter(texts, args.pooling, args.normalize, args.batch_size, args.window)
    it = iter(texts)
    return (v for chunk in iter(lambda: list(itertools.islice(it, args.window)), [])
            for v in model.encode(chunk, args.pooling, args.normalize, args.batch_size, args.chunk_tokens, args.stride or 0))


def cmd_encode(args) -> int:
    if args.stride is not None and args.chunk_tokens is None:
        raise UfcpuError("--stride needs --chunk-tokens N")
    if args.input is not None and args.chunk_tokens is not None:
        raise UfcpuError("--chunk-tokens applies to texts from arguments or stdin, not to --input FILE")
    if args.input is not None:
        from . import corpus
        if args.texts:
            raise UfcpuError("give texts either as arguments or with --input FILE, not both")
        if not args.output:
            raise UfcpuError("--input needs -o/--output FILE (.npy, .jsonl or .parquet)")
        if args.format and args.format != corpus.output_format(args.output):
            raise UfcpuError(f"--format {args.format} disagrees with -o {args.output}: with --input the output's suffix sets the format")
        corpus.check(args.input, args.output, args.field, args.pooling)   # before loading the model
        model = _load(args)
        n = corpus.encode_corpus(model, args.input, args.output, field=args.field, pooling=args.pooling,
                                 normalize=args.normalize, batch_size=args.batch_size, resume=args.resume,
                                 progress=sys.stderr.isatty(), window=args.window)
        log.info("wrote %d rows to %s", n, args.output)
        return 0
    if args.field is not None or args.resume:
        raise UfcpuError("--field and --resume apply only with --input FILE")
    args.format = args.format or "json"
    if args.format == "npy" and not args.output:
        raise UfcpuError("--format npy needs -o FILE")
    if args.format == "npy" and args.pooling == "none":
        raise UfcpuError("--format npy needs one vector per text: use --pooling mean or first")
    model = _load(args)
    texts = _texts(args)
    out = open(args.output, "w", encoding="utf-8") if args.output and args.format != "npy" else sys.stdout
    try:
        if args.format == "npy":
            from .npy_stream import NpyRowWriter
            with NpyRowWriter(args.output, model.config.hidden) as w:
                for vec in _progress(_vectors(model, texts, args), "text"):
                    w.write(vec)
            log.info("wrote %d x %d float32 to %s", w.rows, model.config.hidden, args.output)
            return 0
        t1, t2 = itertools.tee(texts)
        vecs = _progress(_vectors(model, t1, args), "text")
        if args.format == "jsonl":
            for text, vec in zip(t2, vecs):
                out.write(json.dumps({"text": text, "embedding": _as_json(vec)}) + "\n")
        else:
            _write_json_list(out, (_as_json(v) for v in vecs))
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _write_json_list(out, items: Iterable) -> None:
    """One JSON list, written item by item so a long stream never sits in memory whole."""
    out.write("[")
    for n, item in enumerate(items):
        out.write(("," if n else "") + json.dumps(item))
    out.write("]\n")


def cmd_fill_mask(args) -> int:
    model = _load(args)
    print(json.dumps(model.fill_mask(args.text, top_k=args.top_k), indent=2))
    return 0


def _pairs(texts: Iterable[str]) -> Iterator[tuple[str, str]]:
    for n, t in enumerate(texts, 1):
        parts = t.split("\t")
        if len(parts) != 2:
            raise UfcpuError(f"--pair: text {n} has {len(parts) - 1} tabs; expected 'A<TAB>B'")
        yield parts[0], parts[1]


def cmd_classify(args) -> int:
    model = _load(args)
    items = list(_pairs(_texts(args)) if args.pair else _texts(args))
    if not items:
        raise UfcpuError("no texts given")
    preds = model.predict(items, batch_size=args.batch_size)
    if args.format == "jsonl":
        for item, p in zip(items, preds):
            print(json.dumps({"text": item, **p}))
    else:
        print(json.dumps(preds, indent=2))
    return 0


def cmd_convert(args) -> int:
    from pathlib import Path

    from weights_convert.convert import convert

    from .hub import download, is_engine_folder, is_hub_folder, looks_like_repo_id

    src = Path(args.src).expanduser()
    if not src.exists():
        if not looks_like_repo_id(args.src):
            raise UfcpuError(f"{args.src}: no such folder, and not a Hub id")
        src = download(args.src, args.revision)
    dst = Path(args.dst)
    if dst.exists() and not is_engine_folder(dst) and any(dst.iterdir()):
        raise UfcpuError(f"{dst}: exists and is not an engine folder; refusing to replace it")
    if not is_hub_folder(src):
        raise UfcpuError(f"{src}: not a Hub-layout checkpoint (no config.json)")
    print(convert(src, dst))
    return 0


def cmd_info(args) -> int:
    from . import hub, threads
    model = _load(args)
    info = {
        "source": str(model.source),
        "engine_folder": str(model.path),
        "cache_dir": str(hub.cache_dir()),
        "numba_cache_dir": os.environ.get("NUMBA_CACHE_DIR") or "(next to the package)",
        "config": model.config.to_json(),
        "threads": {"kernels": model.threads, "blas": threads.blas_threads(), "cores": threads.cpu_count(),
                    "blas_idle_workers": "sleep" if threads.blas_workers_sleep() else "spin (NumPy was imported first)"},
        "version": _version(),
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_warmup(args) -> int:
    import time

    from . import kernels
    t = time.perf_counter()
    kernels.warmup()
    if args.model:
        from . import load
        load(args.model).encode("warm up")
    log.info("kernels ready in %.1f s", time.perf_counter() - t)
    return 0


def cmd_serve(args) -> int:
    try:
        from .serve import serve
    except ImportError as e:
        raise UfcpuError(f"ufcpu serve needs the server extra ({e.name} is missing): pip install \"ufcpu[server]\"") from None
    return serve(args)


COMMANDS = {"serve": cmd_serve, "encode": cmd_encode, "fill-mask": cmd_fill_mask, "classify": cmd_classify,
            "convert": cmd_convert, "info": cmd_info, "warmup": cmd_warmup}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="ufcpu: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except (UfcpuError, ValueError, OSError) as e:
        # ValueError/OSError here are bad input or files (e.g. an unwritable -o): one line, no traceback.
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"ufcpu: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ufcpu: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our stdout went away (e.g. `| head`): not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
