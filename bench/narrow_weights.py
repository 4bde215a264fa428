"""Narrower FFF weights: would storing w_in and w_out in float16 or bfloat16 keep parity?

Half the bytes per row would halve the walk's memory traffic, but the engine only takes a
shortcut that keeps the reference's answers (1e-5 max abs on hidden states, identical routes).
This rounds every layer's w_in and w_out to the narrow type (computing in float32 as before, the
most favourable case for accuracy) and measures, against the same engine in float32:
- on the reference fixtures (tests/data): the final hidden states against the reference's, and
  the tokens whose route changed;
- with --model PATH (e.g. a random full-size checkpoint, see weights_convert/random_checkpoint.py):
  the final hidden states and the changed routes of 8 English-looking texts of 128 tokens,
  against float32.

    python bench/narrow_weights.py [--model PATH] [--out DIR] [--smoke]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

import ufcpu
from ufcpu import model as fwd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import fmt, log  # noqa: E402

f32 = np.float32
FIXTURES = common.REPO / "tests" / "data"
TOLERANCE = 1e-5          # max abs on hidden states (MODEL.md, tests/test_parity.py)
TEXTS = 8                 # word-salad texts of 128 tokens for --model (bench/ff_layer.py)


def to_bfloat16(a: np.ndarray) -> np.ndarray:  # float32 -> float32 holding the nearest bfloat16
    bits = a.astype(f32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000      # round to nearest, ties to even
    return bits.astype(np.uint32).view(f32)


NARROW = {  # name -> float32 array -> the same values rounded to that type, back in float32
    "float16": lambda a: a.astype(np.float16).astype(f32),
    "bfloat16": to_bfloat16,
}


def narrowed(weights, cast):
    """The same weights with every layer's FFF matrices rounded by `cast`."""
    layers = [dataclasses.replace(ly, w_in=cast(ly.w_in), w_out=cast(ly.w_out)) for ly in weights.layers]
    return dataclasses.replace(weights, layers=layers)


def compare(ids, mask, weights, cfg, want_hidden, want_routes) -> dict:
    """Final hidden states and routes of `weights` against the wanted ones, on real positions."""
    real = mask.astype(bool)
    tr = fwd.encoder_trace(ids, mask, weights, cfg)
    changed = (tr["routes"][:, real] != want_routes[:, real]).any(axis=-1)      # [L, T]
    return {"max_abs": float(np.abs(tr["final_hidden"] - want_hidden)[real].max()),
            "changed_routes": int(changed.sum()), "token_layers": int(changed.size)}


def fixture_rows(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        m = ufcpu.load(FIXTURES / name)
        d = np.load(FIXTURES / name / "expected.npz")
        ids, mask = d["input_ids"], d["attention_mask"]
        for kind, cast in {"float32": None, **NARROW}.items():
            w = m.weights if cast is None else narrowed(m.weights, cast)
            rows.append({"model": name, "against": "reference", "weights": kind,
                         **compare(ids, mask, w, m.config, d["final_hidden"], d["routes"])})
            log(f"{name} {kind}: {rows[-1]}")
    return rows


def model_rows(path: str) -> list[dict]:
    from ff_layer import word_salad
    m = ufcpu.load(path)
    b = m.tokenize(word_salad(TEXTS, np.random.default_rng(0)))
    ids, mask = b["input_ids"], b["attention_mask"]
    base = fwd.encoder_trace(ids, mask, m.weights, m.config)
    rows = []
    for kind, cast in NARROW.items():
        rows.append({"model": Path(str(m.source)).name, "against": "float32", "weights": kind,
                     **compare(ids, mask, narrowed(m.weights, cast), m.config, base["final_hidden"], base["routes"])})
        log(f"{path} {kind}: {rows[-1]}")
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    table = common.md_table(
        ["model", "against", "FFF weights stored as", "final hidden max abs diff", "within 1e-5",
         "token-layers with another route"],
        [[r["model"], r["against"], r["weights"], f"{r['max_abs']:.1e}", "yes" if r["max_abs"] <= TOLERANCE else "no",
          f"{r['changed_routes']} of {r['token_layers']} ({fmt(100 * r['changed_routes'] / r['token_layers'])}%)"]
         for r in rows])
    return (f"# Narrower FFF weights: parity\n\n{__doc__.split(chr(10) + chr(10))[1]}\n\n{table}\n\n"
            f"ufcpu {meta['versions'].get('ufcpu', '?')}, commit {meta.get('git_head') or '?'}.\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="also compare a full-size checkpoint (folder or Hub id)")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--smoke", action="store_true", help="one fixture only: checks the script runs")
    args = ap.parse_args(argv)
    if args.smoke:   # conversions go under --out, not into the user's cache
        os.environ["UFCPU_CACHE"] = str((args.out / "cache").resolve())
    names = ["tiny-ufb"] if args.smoke else sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.npz").is_file())
    rows = fixture_rows(names)
    if args.model:
        rows += model_rows(args.model)
    meta = {"versions": common.versions(), "git_head": common.git_head()}
    common.write_json(args.out / "narrow_weights.json", {"rows": rows, "tolerance": TOLERANCE, **meta})
    common.write_text(args.out / "narrow_weights.md", markdown(rows, meta))
    print(f"wrote {args.out}/narrow_weights.json, narrow_weights.md")
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
