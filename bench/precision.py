"""Accuracy of a reduced-precision mode against float32, per checkpoint (bench/accuracy.py's metrics).

Cases: every fixture in tests/data on its own inputs (`expected.npz`'s batch; trained-tiny's
held-out masked sequences, with labels, and its held-out texts), and the full-size random
checkpoint (bench/common.py writes and caches it; --model names another checkpoint instead) on
trained-tiny's held-out texts. Each case loads the checkpoint twice, float32 and --precision, and
runs both on the same ids. Issue 13's targets are checked per case and printed as pass/fail:
token cosine mean >= 0.999, pooled cosine min >= 0.999, MLM top-1 agreement >= 97%, masked
accuracy within 1 point of float32's. Writes precision.json and precision.md to --out; exits 1 when
a target fails.

    python bench/precision.py --precision int8 [--model FOLDER] [--threads N] [--out DIR] [--smoke]

--precision float32 compares float32 with itself: every figure is exactly 1.0 (the smoke test).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import ufcpu  # noqa: F401  (before NumPy, as for any user)
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
import common  # noqa: E402
from common import log  # noqa: E402

DATA = common.REPO / "tests" / "data"
TEXTS_FROM = DATA / "trained-tiny" / "eval.npz"    # real English prose for the checkpoints without inputs
HELDOUT_TEXTS = 64                                  # held-out texts per text case
SMOKE_TEXTS = 8                                     # --smoke: texts through the tiny random checkpoint


# --- inputs: case -> ids, mask, labels -------------------------------------------------------------

def heldout_texts(n: int) -> list[str]:
    return [str(t) for t in np.load(TEXTS_FROM)["heldout_texts"][:n]]


def text_inputs(model, texts: list[str]) -> dict:
    b = model.tokenize(texts)
    return {"ids": b["input_ids"], "mask": b["attention_mask"], "labels": None,
            "what": f"{len(texts)} held-out texts of trained-tiny"}


def fixture_cases(model_of) -> list[dict]:
    """One case per input set of each tests/data fixture (sorted by name), all of its inputs."""
    cases = []
    for folder in sorted(p for p in DATA.iterdir() if (p / "config.json").is_file()):
        if (folder / "expected.npz").is_file():
            d = np.load(folder / "expected.npz")
            cases.append({"case": folder.name, "path": folder, "ids": d["input_ids"],
                          "mask": d["attention_mask"], "labels": None,
                          "what": "expected.npz batch (padded)"})
        if (folder / "eval.npz").is_file():
            d = np.load(folder / "eval.npz")
            ids = d["input_ids"]
            cases.append({"case": f"{folder.name} (masked held-out)", "path": folder, "ids": ids,
                          "mask": np.ones_like(ids), "labels": d["labels"],
                          "ref_masked_accuracy": float(d["masked_accuracy"]),
                          "what": f"{len(ids)} held-out sequences, 15% masked, with labels"})
            texts = [str(t) for t in d["heldout_texts"][:HELDOUT_TEXTS]]
            cases.append({"case": f"{folder.name} (texts)", "path": folder,
                          **text_inputs(model_of(folder), texts)})
    return cases


# --- running ------------------------------------------------------------------------------------

def cached(loaded: dict, path, precision: str, threads: int | None, role: str = "reference"):
    """One load per (checkpoint, precision, role): the cases of one fixture share their models."""
    key = (str(path), precision, role)
    if key not in loaded:
        loaded[key] = accuracy.load(path, precision, threads)
    return loaded[key]


def run_case(case: dict, precision: str, threads: int | None, loaded: dict) -> dict:
    """Float32 against `precision`, each its own load (float32 against float32: a second load)."""
    ref = cached(loaded, case["path"], "float32", threads)
    other = cached(loaded, case["path"], precision, threads, role="compared")
    t = time.perf_counter()
    m = accuracy.compare(ref, other, case["ids"], case["mask"], case["labels"])
    m["ref_masked_accuracy"] = case.get("ref_masked_accuracy")
    log(f"  {case['case']}: {time.perf_counter() - t:.1f} s")
    path = Path(case["path"]).resolve() if Path(case["path"]).exists() else None
    name = path.relative_to(common.REPO).as_posix() if path and path.is_relative_to(common.REPO) else str(case["path"])
    return {"case": case["case"], "checkpoint": name, "inputs": case["what"],
            "config": ref.config.to_json(), "metrics": m, "targets": accuracy.check_targets(m)}


def markdown(rows: list[dict], precision: str, meta: dict) -> str:
    out = [f"# Accuracy of {precision} against float32", "",
           f"CPU: {meta['cpu_model']} ({', '.join(meta['simd_flags'])}); threads: {meta['threads']}. "
           "Each case runs the checkpoint in float32 and in "
           f"{precision} on the same ids. Token cosine: each real token's final hidden state; pooled: "
           "mean over real tokens; routes: (layer, token) pairs whose whole FFF path is unchanged; "
           "top-1: real tokens whose MLM argmax is unchanged; masked accuracy: argmax = label at the "
           "masked positions (float32 / this precision / the reference's own figure).", ""]
    table = []
    for r in rows:
        m = r["metrics"]
        acc = "-" if m["masked_accuracy"] is None else (
            f"{100 * m['masked_accuracy_ref_model']:.2f} / {100 * m['masked_accuracy']:.2f} / "
            + ("-" if m["ref_masked_accuracy"] is None else f"{100 * m['ref_masked_accuracy']:.2f}") + " %")
        table.append([r["case"], m["tokens"], f"{m['token_cos_mean']:.6f}", f"{m['token_cos_min']:.6f}",
                      f"{m['pooled_cos_min']:.6f}", f"{100 * m['routes_unchanged']:.2f}%",
                      "-" if m["top1_agreement"] is None else f"{100 * m['top1_agreement']:.2f}%", acc,
                      ", ".join(("pass " if ok else "FAIL ") + k for k, ok in r["targets"].items())])
    out.append(common.md_table(["case", "tokens", "token cos mean", "token cos min", "pooled cos min",
                                "routes unchanged", "top-1 agreement", "masked accuracy f32 / this / ref",
                                "targets"], table))
    out += ["", "Targets (issue 13): " + "; ".join(accuracy.target_text(k) for k in accuracy.TARGETS) + ".", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="int8", help="the mode compared with float32 (default int8)")
    ap.add_argument("--model", default=None, help="a checkpoint (Hub id or folder) to report instead of the "
                    "random full-size one")
    ap.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--smoke", action="store_true", help="a tiny random checkpoint instead of the full-size one")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:   # keep everything the smoke run writes inside --out
        os.environ["UFCPU_CACHE"] = str((args.out / "cache").resolve())
    if args.precision != "float32" and not accuracy.supports_precision():
        accuracy.load(DATA / "tiny-ufb", args.precision)          # raises the one-line error
    info = common.machine_info()
    loaded: dict = {}

    def model_of(path):
        return cached(loaded, path, "float32", args.threads)

    cases = fixture_cases(model_of)
    big = args.model or common.bench_checkpoint(args.smoke)
    cases.append({"case": str(args.model) if args.model else ("random checkpoint (smoke)" if args.smoke
                                                              else "full-size random checkpoint"),
                  "path": big, **text_inputs(model_of(big), heldout_texts(SMOKE_TEXTS if args.smoke else HELDOUT_TEXTS))})
    rows = []
    for case in cases:
        log(f"{case['case']}: {case['what']}")
        rows.append(run_case(case, args.precision, args.threads, loaded))
    meta = {"cpu_model": info["cpu_model"], "simd_flags": info["simd_flags"],
            "threads": next(iter(loaded.values())).threads}
    md = markdown(rows, args.precision, meta)
    failed = [(r["case"], k) for r in rows for k, ok in r["targets"].items() if not ok]
    common.write_json(args.out / "precision.json", {
        "benchmark": "precision", "smoke": args.smoke, "precision": args.precision, "against": "float32",
        "machine": info, "threads": meta["threads"],
        "targets": {k: {"limit": v[0], "kind": v[1]} for k, v in accuracy.TARGETS.items()},
        "rows": rows, "failed": failed, "wall_s": time.perf_counter() - started})
    common.write_text(args.out / "precision.md", md)
    print(md)
    for r in rows:
        print(f"{r['case']}: " + ", ".join(f"{accuracy.target_text(k)}: {'pass' if ok else 'FAIL'}"
                                           for k, ok in r["targets"].items()))
    log(f"wrote {args.out / 'precision.json'}, precision.md in {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
