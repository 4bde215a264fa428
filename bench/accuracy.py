"""How far a reduced-precision model is from its float32 version, on the same inputs.

Pure functions of arrays (hidden states, FFF routes, logits) plus `compare`, which runs two loaded
ufcpu models on one batch and applies all of them. bench/precision.py reports them per fixture;
bench/encoder.py uses `token_cosines` for its peers' accuracy columns.

Cosines are computed in float64 as a.b / sqrt(a.a * b.b): for bitwise-equal inputs that is
exactly 1.0, so a float32 model compared with itself gives exactly 1.0 everywhere.
"""
from __future__ import annotations

import inspect

import numpy as np

f64 = np.float64

# issue 13's targets for a reduced-precision mode against float32: metric -> (threshold, kind)
TARGETS = {
    "token_cos_mean": (0.999, "min"),           # mean token cosine >= 0.999
    "pooled_cos_min": (0.999, "min"),           # every pooled embedding's cosine >= 0.999
    "top1_agreement": (0.97, "min"),            # MLM top-1 the same at >= 97% of real tokens
    "masked_accuracy_change": (0.01, "abs"),    # |this accuracy - float32 accuracy| <= 1 point
}
PASSES = {"min": lambda v, limit: v >= limit, "abs": lambda v, limit: abs(v) <= limit}
SIGN = {"min": ">=", "abs": "|.| <="}


# --- metrics of arrays ---------------------------------------------------------------------------

def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # [n, H], [n, H] -> [n] in float64
    a, b = a.astype(f64), b.astype(f64)
    ab, aa, bb = (a * b).sum(-1), (a * a).sum(-1), (b * b).sum(-1)
    den = np.sqrt(aa * bb)
    both_zero = (aa == 0) & (bb == 0)
    return np.where(den > 0, ab / np.where(den > 0, den, 1.0), np.where(both_zero, 1.0, 0.0))


def token_cosines(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:  # [B, S, H] x2, [B, S] -> [T]
    """Cosine of each real token's hidden state in a with the same token's in b."""
    real = mask.astype(bool)
    return _cos(a[real], b[real])


def mean_pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:  # [B, S, H], [B, S] -> [B, H] float64
    m = mask.astype(f64)[:, :, None]
    return (h.astype(f64) * m).sum(1) / np.maximum(m.sum(1), 1.0)


def pooled_cosines(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:  # -> [B]
    """Cosine of each sequence's mean-pooled embedding (real tokens, as Model.encode pools)."""
    return _cos(mean_pool(a, mask), mean_pool(b, mask))


def routes_unchanged(ra: np.ndarray, rb: np.ndarray, mask: np.ndarray) -> float:  # [L, B, S, D+1] x2, [B, S]
    """Fraction of (layer, real token) pairs whose whole FFF path is the same in both."""
    real = mask.astype(bool)
    return float((ra[:, real] == rb[:, real]).all(axis=-1).mean())


def top1_agreement(argmax_a: np.ndarray, argmax_b: np.ndarray, mask: np.ndarray) -> float:  # [B, S] x2, [B, S]
    """Fraction of real tokens whose MLM argmax is the same."""
    real = mask.astype(bool)
    return float((argmax_a[real] == argmax_b[real]).mean())


def masked_accuracy(argmax: np.ndarray, labels: np.ndarray) -> float:  # [B, S], [B, S] (-100: not masked)
    masked = labels != -100
    return float((argmax[masked] == labels[masked]).mean())


def check_targets(metrics: dict) -> dict[str, bool]:
    """-> target name -> pass, for the targets whose metric is present (not None)."""
    out = {}
    for key, (limit, kind) in TARGETS.items():
        v = metrics.get(key)
        if v is not None:
            out[key] = bool(PASSES[kind](v, limit))
    return out


def target_text(key: str) -> str:
    limit, kind = TARGETS[key]
    return f"{key} {SIGN[kind]} {limit:g}"


# --- running models ------------------------------------------------------------------------------

def supports_precision() -> bool:
    """Whether this ufcpu's load() takes precision= (reduced-precision modes are built in)."""
    import ufcpu
    return "precision" in inspect.signature(ufcpu.load).parameters


def load(path, precision: str = "float32", threads: int | None = None):
    """ufcpu.load with a precision; float32 works with every ufcpu, others need precision= support."""
    import ufcpu
    from ufcpu.errors import InputError
    if precision == "float32" and not supports_precision():
        return ufcpu.load(path, threads=threads)
    if not supports_precision():
        raise InputError(f"precision {precision!r} needs ufcpu.load(..., precision=...), which this ufcpu "
                         "does not have (only float32 is built in)")
    return ufcpu.load(path, threads=threads, precision=precision)


def trace(model, ids: np.ndarray, mask: np.ndarray, chunk: int = 8) -> dict[str, np.ndarray]:
    """-> {"hidden" [B, S, H], "routes" [L, B, S, D+1], "argmax" [B, S] (MLM models)}, a few
    sequences at a time so that [chunk, S, V] logits bound the memory."""
    from ufcpu import model as fwd
    parts: dict[str, list] = {"hidden": [], "routes": [], "argmax": []}
    for i in range(0, ids.shape[0], chunk):
        x, m = ids[i:i + chunk], mask[i:i + chunk]
        tr = fwd.encoder_trace(x, m, model.weights, model.config)
        parts["hidden"].append(tr["final_hidden"])
        parts["routes"].append(tr["routes"])
        if model.config.task == "mlm":
            parts["argmax"].append(model.mlm_logits(x, m).argmax(-1))
    out = {"hidden": np.concatenate(parts["hidden"]), "routes": np.concatenate(parts["routes"], axis=1)}
    if parts["argmax"]:
        out["argmax"] = np.concatenate(parts["argmax"])
    return out


def compare(ref, other, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Every metric of `other` against `ref` (two loaded ufcpu models of one checkpoint) on one
    batch; with labels (-100 where not masked), both models' masked-token accuracy."""
    a, b = trace(ref, ids, mask), trace(other, ids, mask)
    tok = token_cosines(a["hidden"], b["hidden"], mask)
    pooled = pooled_cosines(a["hidden"], b["hidden"], mask)
    out = {"sequences": int(ids.shape[0]), "tokens": int(mask.sum()),
           "token_cos_mean": float(tok.mean()), "token_cos_min": float(tok.min()),
           "pooled_cos_min": float(pooled.min()),
           "routes_unchanged": routes_unchanged(a["routes"], b["routes"], mask),
           "top1_agreement": None, "masked_accuracy_ref_model": None, "masked_accuracy": None,
           "masked_accuracy_change": None}
    if "argmax" in a:
        out["top1_agreement"] = top1_agreement(a["argmax"], b["argmax"], mask)
    if labels is not None and "argmax" in a:
        acc_a, acc_b = masked_accuracy(a["argmax"], labels), masked_accuracy(b["argmax"], labels)
        out.update(masked_accuracy_ref_model=acc_a, masked_accuracy=acc_b, masked_accuracy_change=acc_b - acc_a,
                   masked_tokens=int((labels != -100).sum()))
    return out
