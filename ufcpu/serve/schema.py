"""Request bodies -> checked Python values, one pure function per route. A client's mistake is an
ApiError (status, kind, one-line message), never an exception that reaches the log."""
from __future__ import annotations

import dataclasses
import json
from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def invalid(message: str) -> ApiError:
    return ApiError(422, "Validation", message)


@dataclasses.dataclass(frozen=True)
class Limits:
    max_client_batch_size: int
    max_input_length: int
    hidden: int
    vocab: int
    auto_truncate: bool


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise invalid(f"the body is not valid JSON: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(body, dict):
        raise invalid(f"the body must be a JSON object, got {_kind(body)}")
    return body


def _kind(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# field checks by expected kind: (test, description)
_KINDS = {
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "int": (_is_int, "an integer"),
    "str": (lambda v: isinstance(v, str), "a string"),
}


def field(body: dict, name: str, kind: str, default: Any) -> Any:
    """body[name] checked to be of kind (null or absent -> default)."""
    v = body.get(name)
    if v is None:
        return default
    test, what = _KINDS[kind]
    if not test(v):
        raise invalid(f"`{name}` must be {what}, got {_kind(v)}")
    return v


def _positive(body: dict, name: str, default: Any, top: int | None = None) -> Any:
    v = field(body, name, "int", default)
    if v is not None and (v < 1 or (top is not None and v > top)):
        raise invalid(f"`{name}` must be in 1..{top}, got {v}" if top else f"`{name}` must be positive, got {v}")
    return v


def _batch(items: list, limits: Limits, name: str) -> list:
    if not items:
        raise ApiError(422, "Empty", f"`{name}` cannot be empty")
    if len(items) > limits.max_client_batch_size:
        raise ApiError(413, "Validation", f"batch size {len(items)} > maximum allowed batch size "
                                          f"{limits.max_client_batch_size}")
    return items


def texts(body: dict, name: str, limits: Limits) -> list[str]:
    """`inputs`: a string or a list of strings -> non-empty strings."""
    v = body.get(name)
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list):
        raise invalid(f"`{name}` must be a string or an array of strings, got {_kind(v)}")
    for i, t in enumerate(_batch(items, limits, name)):
        if not isinstance(t, str):
            raise invalid(f"`{name}`[{i}] must be a string, got {_kind(t)}")
        if not t:
            raise ApiError(422, "Empty", f"`{name}`[{i}] is an empty string")
    return items


@dataclasses.dataclass(frozen=True)
class Embed:
    texts: list[str]
    normalize: bool
    truncate: bool
    left: bool                   # truncation_direction == "left"
    dimensions: int | None
    chunk_tokens: int | None
    stride: int


DIRECTIONS = {"right": False, "left": True, "Right": False, "Left": True}


def embed(body: dict, limits: Limits, normalize: bool = True) -> Embed:
    """TEI /embed and /embed_all: {"inputs", "normalize", "truncate", "truncation_direction",
    "dimensions"}, plus ufcpu's "chunk_tokens" and "stride" for long documents. normalize: the
    default (TEI normalizes /embed, not /embed_all)."""
    direction = field(body, "truncation_direction", "str", "right")
    if direction not in DIRECTIONS:
        raise invalid(f"`truncation_direction` must be \"right\" or \"left\", got {direction!r}")
    chunk = _positive(body, "chunk_tokens", None, limits.max_input_length)
    stride = field(body, "stride", "int", 0)
    if body.get("stride") is not None and chunk is None:
        raise invalid("`stride` needs `chunk_tokens`")
    return Embed(texts(body, "inputs", limits), field(body, "normalize", "bool", normalize),
                 field(body, "truncate", "bool", limits.auto_truncate), DIRECTIONS[direction],
                 _positive(body, "dimensions", None, limits.hidden), chunk, stride)


@dataclasses.dataclass(frozen=True)
class OpenAIEmbed:
    texts: list[str] | None      # strings, or
    ids: list[list[int]] | None  # token id sequences, read as they are (as /tokenize returns them)
    base64: bool
    dimensions: int | None
    model: str | None


def openai_embed(body: dict, limits: Limits) -> OpenAIEmbed:
    """OpenAI /v1/embeddings: {"input": str | [str] | [int] | [[int]], "model", "encoding_format",
    "dimensions"}."""
    v = body.get("input")
    fmt = field(body, "encoding_format", "str", "float")
    if fmt not in ("float", "base64"):
        raise invalid(f"`encoding_format` must be \"float\" or \"base64\", got {fmt!r}")
    dims = _positive(body, "dimensions", None, limits.hidden)
    model = field(body, "model", "str", None)
    if isinstance(v, list) and v and all(_is_int(x) for x in v):
        v = [v]
    if isinstance(v, list) and v and all(isinstance(x, list) for x in v):
        ids = _batch(v, limits, "input")
        for i, seq in enumerate(ids):
            _check_ids(seq, i, limits)
        return OpenAIEmbed(None, ids, fmt == "base64", dims, model)
    if isinstance(v, list) and not all(isinstance(x, str) for x in v):
        raise invalid("`input` must be a string, an array of strings, an array of token ids or an array "
                      "of arrays of token ids")
    return OpenAIEmbed(texts(body, "input", limits), None, fmt == "base64", dims, model)


def _check_ids(seq: list, i: int, limits: Limits) -> None:
    if not seq:
        raise ApiError(422, "Empty", f"`input`[{i}] is an empty array of token ids")
    if not all(_is_int(x) and 0 <= x < limits.vocab for x in seq):
        raise invalid(f"`input`[{i}] must hold token ids, integers in 0..{limits.vocab - 1}")
    if len(seq) > limits.max_input_length:
        raise invalid(f"`input`[{i}] has {len(seq)} tokens; the model reads at most {limits.max_input_length}")


def predict(body: dict, limits: Limits) -> tuple[list, bool, bool]:
    """TEI /predict: "inputs" is a string, a [a, b] pair, or an array of strings and pairs.
    -> (items, one input given, raw_scores)."""
    v = body.get("inputs")
    raw = field(body, "raw_scores", "bool", False)

    def item(x, where: str):
        if isinstance(x, str) and x:
            return x
        if isinstance(x, list) and len(x) == 2 and all(isinstance(p, str) and p for p in x):
            return (x[0], x[1])
        raise invalid(f"`inputs`{where} must be a non-empty string or a pair [text_a, text_b] of them")

    if isinstance(v, str) or (isinstance(v, list) and len(v) == 2 and all(isinstance(p, str) for p in v)):
        return [item(v, "")], True, raw
    if not isinstance(v, list):
        raise invalid(f"`inputs` must be a string, a pair or an array of them, got {_kind(v)}")
    return [item(x, f"[{i}]") for i, x in enumerate(_batch(v, limits, "inputs"))], False, raw


def fill_mask(body: dict, limits: Limits) -> tuple[str, int]:
    v = body.get("inputs")
    if not isinstance(v, str) or not v:
        raise invalid(f"`inputs` must be a non-empty string, got {_kind(v)}")
    return v, _positive(body, "top_k", 5, 1000)


def tokenize(body: dict, limits: Limits) -> tuple[list[str], bool]:
    return texts(body, "inputs", limits), field(body, "add_special_tokens", "bool", True)


def decode(body: dict, limits: Limits) -> tuple[list[list[int]], bool]:
    v = body.get("ids")
    seqs = [v] if isinstance(v, list) and all(_is_int(x) for x in v) else v
    if not isinstance(seqs, list) or not all(isinstance(s, list) and all(_is_int(x) and 0 <= x < limits.vocab
                                                                       for x in s) for s in seqs):
        raise invalid(f"`ids` must be an array of token ids (integers in 0..{limits.vocab - 1}) or an array of them")
    return _batch(seqs, limits, "ids"), field(body, "skip_special_tokens", "bool", True)
