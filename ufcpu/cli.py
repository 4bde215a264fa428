"""`ufcpu` command line: argument parsing and printing only; the math lives in the library.

Errors (bad arguments, bad input, bad checkpoints) exit with code 2 and one line on stderr.
Results go to stdout (or -o); logs, warnings and progress go to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Iterable, Iterator

from . import heads, textio
from .errors import UfcpuError
from .textio import windows

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


def milliseconds(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds (a number >= 0), got {s!r}") from None
    if not 0 <= v <= 3_600_000:   # (NaN fails both)
        raise argparse.ArgumentTypeError(f"expected milliseconds between 0 and 3600000, got {s}")
    return v


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="Hub id, Hub-layout folder or converted folder (default: pbelcak/UltraFastBERT-1x11-long)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--threads", type=positive_int, default=None, help="threads for BLAS and the kernels (default: all cores)")
    p.add_argument("--check", action="store_true", help="scan every weight for NaN/inf at load")
    p.add_argument("--precision", choices=("float32", "int8"), default="float32",
                   help="float32 (exact) or int8 attention projections and heads (faster; README, Precision)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ufcpu", description="Torch-free CPU inference for UltraFastBERT (fast feedforward for real).")
    p.add_argument("--version", action="version", version=f"ufcpu {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    e = sub.add_parser("encode", help="sentence embeddings, from arguments, stdin (one text per line) or --input FILE")
    _model_args(e)
    e.add_argument("texts", nargs="*", metavar="TEXT", help="texts to encode (default: one per line on stdin)")
    e.add_argument("--pooling", choices=heads.ENCODE_POOLING, default="mean")
    e.add_argument("--normalize", action="store_true", help="L2-normalize each embedding")
    e.add_argument("--format", choices=("json", "jsonl", "npy", "parquet"), default=None,
                   help="output format (default: set by -o's suffix, else json)")
    e.add_argument("-o", "--output", default=None,
                   help="output file: .json, .jsonl, .npy or .parquet (npy and parquet need one; with --input: "
                        ".npy, .jsonl or .parquet); default stdout")
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

    k = sub.add_parser("cache", help="list converted checkpoints, or prune them")
    k.add_argument("action", nargs="?", choices=("list", "prune"), default="list")
    k.add_argument("--older-than", type=float, default=None, metavar="DAYS", help="prune: those not used for DAYS")
    k.add_argument("--all", action="store_true", help="prune: every converted checkpoint")

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
    s.add_argument("--max-wait-ms", type=milliseconds, default=2.0, help="wait after a lone request for others to batch with (default 2)")
    s.add_argument("--return-wait-ms", type=milliseconds, default=50.0,
                   help="wait after a batch for the clients it answered to send their next request (default 50; 0: never)")
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

def _stdin_is_empty_tty() -> bool:
    return sys.stdin is None or sys.stdin.isatty()


def _stdin_texts() -> Iterable[str]:
    """stdin read whole, one text per line (classify needs every item before it starts)."""
    if _stdin_is_empty_tty():
        raise UfcpuError("no TEXT given and nothing on stdin")
    return textio.utf8_lines(sys.stdin.buffer, lambda n: "stdin")


def _texts(args) -> Iterable[str]:
    return args.texts if args.texts else _stdin_texts()


# --- commands -------------------------------------------------------------------------------------

def _load(args, **kw):
    from . import load
    return load(args.model, revision=args.revision, threads=args.threads, check=args.check,
                precision=args.precision, **kw)


def _stream_format(args) -> str:
    """Arguments and stdin: -o's suffix sets the format (.json, .jsonl, .npy, .parquet), as with
    --input; --format must agree with it; neither: json."""
    named = textio.suffix_format(args.output) if args.output else None
    if args.format and named and args.format != named:
        raise UfcpuError(f"--format {args.format} disagrees with -o {args.output} (a .{named} file): "
                         f"the output's suffix sets the format")
    return args.format or named or "json"


def cmd_encode(args) -> int:
    from . import corpus
    if args.stride is not None and args.chunk_tokens is None:
        raise UfcpuError("--stride needs --chunk-tokens N")
    if args.input is not None and args.chunk_tokens is not None:
        raise UfcpuError("--chunk-tokens applies to texts from arguments or stdin, not to --input FILE")
    if args.input is not None:
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
    fmt = _stream_format(args)
    writer_cls = textio.WRITERS[fmt]
    if writer_cls.needs_file and not args.output:
        raise UfcpuError(f"--format {fmt} needs -o FILE")
    if args.pooling in heads.RAGGED_POOLING and writer_cls.one_vector_per_text:
        raise UfcpuError(f"--format {fmt} needs one vector per text: use --pooling mean or first")
    if not args.texts and _stdin_is_empty_tty():
        raise UfcpuError("no TEXT given and nothing on stdin")
    model = _load(args)
    chunks = windows(args.texts or textio.stdin_texts(), args.window)
    output = Path(args.output) if args.output else None
    with corpus.claimed_output(model, output, args.pooling, args.normalize) if output else contextlib.nullcontext():
        writer = writer_cls(output, model.config.hidden, False)
        n = corpus.encode_stream(model, chunks, writer, args.pooling, args.normalize, args.batch_size,
                                 progress=sys.stderr.isatty(), where=None if args.texts else "stdin",
                                 chunk_tokens=args.chunk_tokens, stride=args.stride or 0)
    if args.output:
        log.info("wrote %d rows (%s, width %d) to %s", n, fmt, model.config.hidden, args.output)
    return 0


def cmd_fill_mask(args) -> int:
    model = _load(args)
    print(json.dumps(model.fill_mask(args.text, top_k=args.top_k), indent=2))
    return 0


def _pairs(texts: Iterable[str]) -> Iterator[tuple[str, str]]:
    for n, t in enumerate(texts):
        parts = t.split("\t")
        if len(parts) != 2:
            raise UfcpuError(f"--pair: text {n} (counting from 0) has {len(parts) - 1} tabs; expected 'A<TAB>B'")
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

    from .hub import convert_folder, source_folder

    src = source_folder(args.src, args.revision)
    print(convert_folder(src, Path(args.dst))[0])
    return 0


def cmd_cache(args) -> int:
    import datetime

    from . import hub

    if args.action == "prune":
        if args.older_than is not None and args.older_than < 0:
            raise UfcpuError(f"--older-than must be a number of days >= 0, got {args.older_than}")
        removed = hub.prune_cache(args.older_than, everything=args.all)
        log.info("removed %d folder(s) from %s", len(removed), hub.cache_dir())
        for p in removed:
            print(p)
        return 0
    if args.older_than is not None or args.all:
        raise UfcpuError("--older-than and --all go with `ufcpu cache prune`")
    entries = hub.cache_entries()
    if not entries:
        log.info("no converted checkpoints in %s", hub.cache_dir())
    for e in entries:
        used = datetime.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M")
        print(f"{e.bytes / 2**20:9.1f} MB  last used {used}  {e.path.name}  <- {e.source}")
    return 0


CPU_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
_PACKAGES = ("numpy", "numba", "tokenizers", "safetensors", "huggingface_hub")


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """The CPU's model name and which of CPU_FEATURES its flags list (empty where /proc is not)."""
    name, flags = None, set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name is None:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": name, "features": [f for f in CPU_FEATURES if f in flags]}


def _package_versions() -> dict:
    from importlib import metadata
    out = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _default_model_cached() -> bool:
    """Whether the default checkpoint is in huggingface_hub's cache (info never downloads it)."""
    from .hub import DEFAULT_MODEL
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(DEFAULT_MODEL, "config.json"), str)
    except Exception:   # an old huggingface_hub, or an unreadable cache: treat as not cached
        return False


def cmd_info(args) -> int:
    """The environment always; the model's part when one loads (--model, or the default if cached)."""
    from . import hub, quant, settings, threads
    info = {
        "version": _version(),
        "versions": _package_versions(),
        "cache_dir": str(hub.cache_dir()),
        "numba_cache_dir": settings.kernel_cache_dir() or "(none usable: kernels compile in every process)",
        "threads": {"kernels": args.threads or threads.cpu_count(), "blas": threads.blas_threads(),
                    "cores": threads.cpu_count(),
                    "blas_idle_workers": "sleep" if settings.blas_workers_sleep() else "spin (NumPy was imported first)"},
        "cpu": cpu_info(),
        "int8_kernels": quant.describe(),
    }
    error = None
    if args.model is None and not _default_model_cached():
        info["model"] = f"none loaded (pass --model; {hub.DEFAULT_MODEL} is not in the local cache)"
    else:
        try:
            model = _load(args)
        except (UfcpuError, ValueError, OSError) as e:
            error = e
            info["model"] = f"cannot be loaded: {_one_line(e)}"
        else:
            info.update({"source": str(model.source), "engine_folder": str(model.path),
                         "config": model.config.to_json(), "precision": model.precision})
            info["threads"]["kernels"] = model.threads
            with threads.calls(model.threads):   # what every call of the model runs with
                info["threads"]["blas"] = threads.blas_threads()
    print(json.dumps(info, indent=2))
    if error is not None:
        raise error
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
            "convert": cmd_convert, "cache": cmd_cache, "info": cmd_info, "warmup": cmd_warmup}


class _Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C, so every writer closes cleanly."""


def _on_signal(signum, frame):
    raise _Signalled(signum)


def _one_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _quiet_stdout() -> None:
    """The reader of stdout went away (`| head`): later writes and the flush at exit go nowhere."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="ufcpu: %(message)s", stream=sys.stderr)
    from . import settings
    if settings.malloc_tuning_wanted():
        settings.tune_malloc()     # freed activations reused across layers: it pays (bench/README.md, "Memory")
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _on_signal)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:      # before OSError: not an error, as for other command-line tools
        _quiet_stdout()
        return 0
    except (UfcpuError, ValueError, OSError) as e:
        # ValueError/OSError here are bad input or files (e.g. an unwritable -o): one line, no traceback.
        print(f"ufcpu: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        signum = e.args[0] if isinstance(e, _Signalled) else signal.SIGINT
        print(f"ufcpu: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
