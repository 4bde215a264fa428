"""Long fuzz run of the safetensors reader (ufcpu.safetensors_io), with atheris (libFuzzer).

    pip install atheris
    python fuzz/fuzz_safetensors.py -max_total_time=600            # ~10 minutes
    python fuzz/fuzz_safetensors.py --hypothesis 200000            # without atheris: hypothesis

The property is the one tests/test_fuzz_safetensors.py checks at a small budget: whatever the bytes,
`open_tensors` returns arrays that lie inside the file, do not overlap and are read-only, or raises
CheckpointError with a one-line message that starts with the file name. Anything else (another
exception type, a crash, a hang) is a finding: libFuzzer stops and writes the input to crash-*.
Where the reference `safetensors` package reads the same bytes and every dtype is one we read,
the arrays must be equal.

Inputs are used two ways, chosen by the first byte: as the raw file (libFuzzer mutates a seed
corpus of valid files with a dictionary of the format's keywords), or through atheris'
FuzzedDataProvider to build a header whose entries have the right form but fuzzed values. The
corpus and dictionary live in $UFCPU_FUZZ_DIR (default: <tmp>/ufcpu-fuzz-safetensors), written on
the first run. Every 50,000 inputs it prints `inputs: N ...`; libFuzzer's last line,
`Done N runs in T second(s)`, is the total (the count in the README).
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DTYPE_NAMES = ["F64", "F32", "F16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
               "BF16", "F8_E4M3", "F8_E5M2", "C64", "f32"]
KEYWORDS = ["__metadata__", "dtype", "shape", "data_offsets", "format", "pt", *DTYPE_NAMES]
COUNT = {"inputs": 0, "accepted": 0, "refused": 0, "reference_agreed": 0}
_START = time.time()
_PATH = Path(tempfile.mkdtemp(prefix="ufcpu-fuzz-")) / "f.safetensors"   # one small file, rewritten per input


def st_file(header: dict | bytes, data: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + data


def write_seeds(folder: Path) -> None:
    """A few valid files: every dtype, scalars, empty tensors, metadata, several tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    seeds = {
        "empty": ({}, b""),
        "meta": ({"__metadata__": {"format": "pt"}}, b""),
    }
    for dt in ["F64", "F32", "F16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"]:
        size = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4}.get(dt, 2 if dt[-2:] == "16" else 1)
        raw = rng.integers(0, 2, size * 6, dtype=np.uint8).tobytes()
        seeds[f"one-{dt}"] = ({"t": {"dtype": dt, "shape": [2, 3], "data_offsets": [0, len(raw)]}}, raw)
    seeds["several"] = ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [], "data_offsets": [8, 12]},
                         "c": {"dtype": "I8", "shape": [0, 4], "data_offsets": [12, 12]},
                         "__metadata__": {"format": "pt"}}, bytes(range(12)))
    for name, (header, data) in seeds.items():   # first byte even: the raw-file mode
        (folder / name).write_bytes(b"\x00" + st_file(header, data))


def write_dict(path: Path) -> None:
    path.write_text("".join(f'kw{i}="{w}"\n' for i, w in enumerate(KEYWORDS)) +
                    'q="\\x22"\nc=":"\nlb="["\nrb="]"\nlc="{"\nrc="}"\n')


def structured(fdp) -> bytes:
    """A header of well-formed entries with fuzzed values, and fuzzed data bytes."""
    header: dict = {}
    if fdp.ConsumeBool():
        header["__metadata__"] = {"format": fdp.ConsumeUnicodeNoSurrogates(4)}
    for i in range(fdp.ConsumeIntInRange(0, 4)):
        dtype = DTYPE_NAMES[fdp.ConsumeIntInRange(0, len(DTYPE_NAMES) - 1)]
        ndim = fdp.ConsumeIntInRange(0, 5)
        shape = [fdp.ConsumeIntInRange(-1, 2 ** 40) if fdp.ConsumeProbability() < 0.05 else fdp.ConsumeIntInRange(0, 6)
                 for _ in range(ndim)]
        begin = fdp.ConsumeIntInRange(-4, 96)
        end = fdp.ConsumeIntInRange(-4, 128) if fdp.ConsumeBool() else begin + 4 * max(1, math.prod(shape) if shape else 1)
        entry: dict = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        if fdp.ConsumeProbability() < 0.05:
            entry.pop(["dtype", "shape", "data_offsets"][fdp.ConsumeIntInRange(0, 2)])
        header[fdp.ConsumeUnicodeNoSurrogates(3) or f"t{i}"] = entry
    data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 160))
    return st_file(header, data)


def reference(raw: bytes):
    from safetensors.numpy import load
    try:
        return load(raw)
    except Exception:
        return None


def check(raw: bytes) -> None:
    from ufcpu.errors import CheckpointError
    from ufcpu.safetensors_io import open_tensors, read_header

    COUNT["inputs"] += 1
    _PATH.write_bytes(raw)
    try:
        arrays = open_tensors(_PATH)
    except CheckpointError as e:
        msg = str(e)
        if not msg.startswith(str(_PATH) + ": ") or "\n" in msg or len(msg) > 1000:
            raise AssertionError(f"badly formed message: {msg!r}")
        COUNT["refused"] += 1
        return
    COUNT["accepted"] += 1
    header, start, size = read_header(_PATH)
    spans = []
    for name, a in arrays.items():
        b, e = header[name]["data_offsets"]
        assert start <= start + b <= start + e <= size, name
        assert a.nbytes == e - b and not a.flags.writeable, name
        if a.nbytes:
            spans.append((b, e))
    spans.sort()
    assert all(e0 <= b1 for (_, e0), (b1, _) in zip(spans, spans[1:])), spans
    ref = reference(raw)
    if ref is not None:
        for name, a in arrays.items():
            assert a.tobytes() == np.ascontiguousarray(ref[name]).tobytes(), name
        COUNT["reference_agreed"] += 1


def test_one_input(data: bytes) -> None:
    if COUNT["inputs"] % 50_000 == 0 and COUNT["inputs"]:
        report()   # libFuzzer ends with os._exit: no atexit; its last line "Done N runs" is the total
    if not data:
        return check(data)
    if data[0] & 1:
        import atheris
        return check(structured(atheris.FuzzedDataProvider(data[1:])))
    return check(data[1:])


def report() -> None:
    elapsed = time.time() - _START
    print(f"inputs: {COUNT['inputs']} in {elapsed:.0f} s (accepted {COUNT['accepted']}, refused "
          f"{COUNT['refused']}, equal to the reference on {COUNT['reference_agreed']})", file=sys.stderr,
          flush=True)


def main_atheris(argv: list[str]) -> None:
    import atheris

    import numba  # noqa: F401  (ufcpu's heavy dependencies: imported, not instrumented)
    import tokenizers  # noqa: F401
    import safetensors.numpy  # noqa: F401
    with atheris.instrument_imports(include=["ufcpu"]):   # coverage feedback from ufcpu only
        import ufcpu.safetensors_io  # noqa: F401
    work = Path(os.environ.get("UFCPU_FUZZ_DIR") or Path(tempfile.gettempdir()) / "ufcpu-fuzz-safetensors")
    corpus = work / "corpus"
    if not corpus.exists():
        write_seeds(corpus)
    dict_path = work / "safetensors.dict"
    write_dict(dict_path)
    args = [argv[0], *argv[1:]]
    if not any(a.startswith("-dict=") for a in args):
        args.append(f"-dict={dict_path}")
    if not any(a.startswith("-max_len=") for a in args):
        args.append("-max_len=2048")
    if not any(not a.startswith("-") for a in args[1:]):
        args.append(str(corpus))
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


def main_hypothesis(n: int) -> None:
    """Without atheris: the property tests of tests/test_fuzz_safetensors.py with a large budget."""
    import subprocess
    env = {**os.environ, "UFCPU_FUZZ_EXAMPLES": str(n)}
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(HERE.parent / "tests" / "test_fuzz_safetensors.py")], env=env)
    print(f"hypothesis: {n} examples per property in {time.time() - t:.0f} s", file=sys.stderr)
    sys.exit(p.returncode)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--hypothesis":
        main_hypothesis(int(sys.argv[2]))
    else:
        main_atheris(sys.argv)
