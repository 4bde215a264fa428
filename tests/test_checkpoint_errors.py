"""Broken, truncated, corrupted and unsupported checkpoints: each is refused at load with a
`CheckpointError` (a ValueError) whose one-line message names the file and the problem, before
any kernel runs; through the CLI, exit code 2 and one line on stderr.

Checkpoints are small random ones in the exact Hub layout (weights_convert.random_checkpoint),
corrupted one way per test.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import ufcpu
from ufcpu import CheckpointError, layout
from ufcpu.errors import CacheError, UfcpuError
from weights_convert.convert import convert
from weights_convert.random_checkpoint import write_random_checkpoint

from test_cli import assert_one_line_error, run

DIMS = dict(layers=1, hidden=16, heads=2, depth=2, vocab=256, max_seq=16)
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("pristine") / "ckpt", **DIMS)


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    """A fresh copy of a valid small checkpoint, to corrupt."""
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


@pytest.fixture
def engine_dir(ckpt, tmp_path) -> Path:
    """The same checkpoint converted to the engine layout."""
    return convert(ckpt, tmp_path / "engine")


def refused(path, *words, **load_kw) -> str:
    """ufcpu.load(path) raises CheckpointError (a ValueError) whose one-line message has every word."""
    with pytest.raises(CheckpointError) as info:
        ufcpu.load(path, **load_kw)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, UfcpuError)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


# --- safetensors helpers -----------------------------------------------------------------------

def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: dict | bytes, data: bytes, align: bool = True) -> None:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    if align:
        h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)


def edit_header(path: Path, fn) -> None:
    header, data = read_st(path)
    fn(header)
    write_st(path, header, data)


def edit_config(folder: Path, fn, name: str = "config.json") -> None:
    p = folder / name
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg))


W_IN = "encoder.layers.0.ffn.linear_in.weight"


def test_the_pristine_checkpoint_loads(ckpt):
    model = ufcpu.load(ckpt, check=True)
    assert model.encode("hello").shape == (16,)


# --- missing files and folders -----------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder, and not a Hub id"):
        ufcpu.load(tmp_path / "does" / "not" / "exist")


def test_folder_without_config(ckpt):
    (ckpt / "config.json").unlink()
    refused(ckpt, str(ckpt), "neither a Hub-layout checkpoint (config.json) nor a converted engine folder")


def test_a_file_instead_of_a_folder(ckpt):
    refused(ckpt / "config.json", "expected a checkpoint folder, got a file")


def test_missing_weights(ckpt):
    (ckpt / WEIGHTS).unlink()
    refused(ckpt, str(ckpt), "no weights found (expected one of model.safetensors")


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    refused(ckpt, str(ckpt), "missing tokenizer.json")


def test_engine_folder_missing_weights(engine_dir):
    (engine_dir / "engine.safetensors").unlink()
    refused(engine_dir, str(engine_dir / "engine.safetensors"), "file not found")


def test_engine_folder_missing_tokenizer(engine_dir):
    (engine_dir / "tokenizer.json").unlink()
    refused(engine_dir, str(engine_dir / "tokenizer.json"), "file not found")


# --- config.json -------------------------------------------------------------------------------

def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text('{"arch": {"hidden_size": 16,,}')
    refused(ckpt, str(ckpt / "config.json"), "not valid JSON (Expecting property name")


def test_config_not_utf8(ckpt):
    (ckpt / "config.json").write_bytes(b'{"arch": "\xff\xfe"}')
    refused(ckpt, str(ckpt / "config.json"), "cannot read")


def test_config_nested_too_deeply(ckpt):
    (ckpt / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(ckpt, str(ckpt / "config.json"), "not valid JSON (nested too deeply)")


def test_config_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[1, 2]")
    refused(ckpt, str(ckpt / "config.json"), "expected a JSON object, got list")


def test_config_without_arch(ckpt):
    edit_config(ckpt, lambda c: c.pop("arch"))
    refused(ckpt, "config.json", "missing the 'arch' section")


@pytest.mark.parametrize("key", ["hidden_size", "num_transformer_layers", "intermed_depth",
                                 "embedding.vocab_size", "attention.num_attention_heads"])
def test_config_missing_key(ckpt, key):
    def drop(c):
        d = c["arch"]
        *parents, last = key.split(".")
        for p in parents:
            d = d[p]
        del d[last]
    edit_config(ckpt, drop)
    refused(ckpt, "config.json", f"missing key 'arch.{key}'")


@pytest.mark.parametrize("edit,words", [
    (lambda c: c.update(model_type="bert"), ["model_type 'bert' is not supported (expected 'crammedBERT')"]),
    (lambda c: c.pop("model_type"), ["model_type None is not supported"]),
    (lambda c: c.update(architectures=["BertForMaskedLM"]), ["architecture ['BertForMaskedLM'] is not supported"]),
    (lambda c: c.update(architectures="ScriptableLMForPreTraining"), ["architecture", "is not supported"]),
    (lambda c: c["arch"].update(intermed_size=4),
     ["arch.intermed_size = 4 is not supported (several parallel trees per layer); this engine implements 1"]),
    (lambda c: c["arch"]["attention"].update(rotary_embedding=True),
     ["arch.attention.rotary_embedding = True is not supported (rotary embeddings)"]),
    (lambda c: c["arch"].update(intermed_type="ff"),
     ["arch.intermed_type = 'ff' is not supported (dense feedforward layers"]),
    (lambda c: c["arch"]["attention"].update(causal_attention=True), ["causal attention"]),
    (lambda c: c["arch"]["attention"].update(sequence_op="exp"), ["arch.attention.sequence_op = 'exp'"]),
    (lambda c: c["arch"]["embedding"].update(pos_embedding="learned"), ["arch.embedding.pos_embedding = 'learned'"]),
    (lambda c: c["arch"].update(norm_scheme="post"), ["arch.norm_scheme = 'post'"]),
    (lambda c: c["arch"].update(norm="RMSNorm"), ["arch.norm = 'RMSNorm'"]),
    (lambda c: c["arch"].update(nonlin="ReLU"), ["arch.nonlin = 'ReLU'"]),
    (lambda c: c["arch"].update(use_bias=True), ["arch.use_bias = True"]),
    (lambda c: c["arch"].update(ffn_layer_frequency=2), ["arch.ffn_layer_frequency = 2"]),
    (lambda c: c["arch"]["embedding"].update(normalization=False), ["arch.embedding.normalization = False"]),
    (lambda c: c["arch"].update(intermed_size=1.0), ["arch.intermed_size = 1.0 is not supported"]),
    (lambda c: c["arch"].update(intermed_depth=-1), ["arch.intermed_depth must be an integer in 0..24, got -1"]),
    (lambda c: c["arch"].update(intermed_depth="2"), ["arch.intermed_depth must be an integer in 0..24, got '2'"]),
    (lambda c: c["arch"].update(intermed_depth=40), ["got 40"]),
    (lambda c: c["arch"].update(hidden_size=0), ["arch.hidden_size must be a positive integer, got 0"]),
    (lambda c: c["arch"].update(num_transformer_layers=True), ["arch.num_transformer_layers must be a positive integer, got True"]),
    (lambda c: c["arch"]["attention"].update(num_attention_heads=3), ["hidden_size 16 is not divisible into 3 heads"]),
    (lambda c: c["arch"]["embedding"].update(embedding_dim=32), ["embedding_dim 32 != hidden_size 16"]),
    (lambda c: c["arch"].update(norm_eps="tiny"), ["arch.norm_eps must be a non-negative number, got 'tiny'"]),
    (lambda c: c["arch"].update(norm_eps=float("nan")), ["arch.norm_eps must be a non-negative number, got nan"]),
    (lambda c: c["arch"]["embedding"].update(max_seq_length=None), ["arch.embedding.max_seq_length must be a positive integer"]),
])
def test_config_unsupported_or_invalid(ckpt, edit, words):
    edit_config(ckpt, edit)
    refused(ckpt, str(ckpt / "config.json"), *words)


@pytest.fixture
def cls_ckpt(tmp_path) -> Path:
    return write_random_checkpoint(tmp_path / "cls", **DIMS, task="classification", num_labels=3, head_dim=8)


@pytest.mark.parametrize("edit,words", [
    (lambda c: c["arch"].update(classification_head="avg"), ["arch.classification_head must be an object"]),
    (lambda c: c["arch"]["classification_head"].update(pooler="cls"), ["classification_head.pooler 'cls' is not supported"]),
    (lambda c: c["arch"]["classification_head"].update(nonlin="ReLU"), ["classification_head.nonlin 'ReLU'"]),
    (lambda c: c["arch"]["classification_head"].update(head_dim="big"), ["head_dim must be a positive integer, got 'big'"]),
    (lambda c: c["arch"]["classification_head"].update(include_ff_layer="yes"), ["include_ff_layer must be true or false"]),
    (lambda c: c.update(id2label={"a": "x"}), ["id2label keys must be integers"]),
    (lambda c: c.update(id2label={"0": "x", "5": "y"}), ["id2label keys must be 0..1"]),
])
def test_classification_config_invalid(cls_ckpt, edit, words):
    edit_config(cls_ckpt, edit)
    refused(cls_ckpt, "config.json", *words)


def test_classification_head_shapes(cls_ckpt):
    edit_header(cls_ckpt / WEIGHTS, lambda h: h.pop("head.weight"))
    refused(cls_ckpt, WEIGHTS, "classification checkpoint has no 'head.weight'")


def test_mlm_ignores_a_malformed_classification_head(ckpt):
    """An MLM checkpoint never reads the classifier options: nonsense there does not matter."""
    edit_config(ckpt, lambda c: c["arch"].update(classification_head={"head_dim": "?", "pooler": 3}))
    assert ufcpu.load(ckpt).encode("a").shape == (16,)


# --- safetensors: truncated or corrupted ---------------------------------------------------------

def test_truncated_weights(ckpt):
    p = ckpt / WEIGHTS
    p.write_bytes(p.read_bytes()[:-100])
    refused(ckpt, str(p), "lies outside the file", "truncated or corrupted")


def test_weights_shorter_than_the_length_field(ckpt):
    (ckpt / WEIGHTS).write_bytes(b"\x01\x02")
    refused(ckpt, str(ckpt / WEIGHTS), "not a safetensors file (shorter than 8 bytes)")


def test_empty_weights_file(ckpt):
    (ckpt / WEIGHTS).write_bytes(b"")
    refused(ckpt, str(ckpt / WEIGHTS), "shorter than 8 bytes")


def test_header_length_larger_than_the_file(ckpt):
    p = ckpt / WEIGHTS
    raw = p.read_bytes()
    p.write_bytes((len(raw) + 1).to_bytes(8, "little") + raw[8:])
    refused(ckpt, str(p), f"safetensors header length {len(raw) + 1} does not fit in a file of {len(raw)} bytes")


def test_absurd_header_length(ckpt):
    p = ckpt / WEIGHTS
    p.write_bytes((2 ** 64 - 1).to_bytes(8, "little") + p.read_bytes()[8:])
    refused(ckpt, str(p), "header length 18446744073709551615 does not fit")


def test_pickle_renamed_to_safetensors(ckpt):
    (ckpt / WEIGHTS).write_bytes(b"\x80\x04\x95" + b"\x00" * 64)   # a pickle's first bytes
    refused(ckpt, str(ckpt / WEIGHTS), "does not fit in a file")


@pytest.mark.parametrize("header,words", [
    (b"{not json", ["safetensors header is not valid JSON"]),
    (b"\xff\xfe\x00", ["safetensors header is not valid JSON"]),
    (b"[1, 2]", ["safetensors header is not a JSON object"]),
    (b"[" * 200000 + b"]" * 200000, ["safetensors header is not valid JSON"]),
    (b"1" * 5000, ["safetensors header is not valid JSON"]),
    (b'"a string"', ["safetensors header is not a JSON object"]),
], ids=["syntax", "not-utf8", "list", "deep-nesting", "huge-int", "string"])
def test_header_not_an_object(ckpt, header, words):
    _, data = read_st(ckpt / WEIGHTS)
    write_st(ckpt / WEIGHTS, header, data)
    refused(ckpt, str(ckpt / WEIGHTS), *words)


def _set(name, key, value):
    def fn(h):
        h[name][key] = value
    return fn


@pytest.mark.parametrize("edit,words", [
    (_set(W_IN, "dtype", "F8_E4M3"), [f"tensor '{W_IN}' has unsupported dtype 'F8_E4M3'"]),
    (_set(W_IN, "dtype", ["F32"]), [f"tensor '{W_IN}' has unsupported dtype"]),
    (_set(W_IN, "dtype", "BF16"), ["unsupported dtype 'BF16'"]),
    (_set(W_IN, "shape", [7, -16]), ["has an invalid shape [7, -16]"]),
    (_set(W_IN, "shape", [7, 16.0]), ["has an invalid shape"]),
    (_set(W_IN, "shape", "7x16"), ["has an invalid shape"]),
    (_set(W_IN, "shape", [1] * 40), ["has an invalid shape"]),
    (_set(W_IN, "shape", [0, 2 ** 62]), ["has an impossible shape [0, 4611686018427387904]"]),
    (_set(W_IN, "shape", [8, 16]), ["has 448 bytes for shape [8, 16] of F32 (512 expected)"]),
    (_set(W_IN, "data_offsets", [0]), ["has invalid data_offsets [0]"]),
    (_set(W_IN, "data_offsets", [-8, 440]), ["lies outside the file (offsets -8..440"]),
    (_set(W_IN, "data_offsets", [10 ** 9, 10 ** 9 + 448]), ["lies outside the file", "truncated or corrupted"]),
    (_set(W_IN, "data_offsets", [448, 0]), ["lies outside the file"]),
    (lambda h: h[W_IN].pop("dtype"), ["has a malformed header entry"]),
    (lambda h: h.update({"x": [1, 2]}), ["tensor 'x' has a malformed header entry"]),
    (lambda h: h.update({"evil\nname" * 100: 3}), ["malformed header entry"]),
])
def test_corrupted_header_entry(ckpt, edit, words):
    edit_header(ckpt / WEIGHTS, edit)
    msg = refused(ckpt, str(ckpt / WEIGHTS), *words)
    assert len(msg) < 600


def test_overlapping_tensors(ckpt):
    header, data = read_st(ckpt / WEIGHTS)
    # two tensors of one size made to share bytes
    a, b = "encoder.layers.0.norm1.weight", "encoder.layers.0.norm1.bias"
    header[b]["data_offsets"] = [header[a]["data_offsets"][0] + 4, header[a]["data_offsets"][1] + 4]
    write_st(ckpt / WEIGHTS, header, data)
    refused(ckpt, str(ckpt / WEIGHTS), "overlap")


def test_duplicate_tensor_name(ckpt):
    header, data = read_st(ckpt / WEIGHTS)
    text = json.dumps(header)
    entry = json.dumps(header[W_IN])
    text = text[:-1] + f', "{W_IN}": {entry}' + "}"
    write_st(ckpt / WEIGHTS, text.encode(), data)
    refused(ckpt, str(ckpt / WEIGHTS), f"safetensors header names '{W_IN}' twice")


def test_tree_size_disagrees_with_intermed_depth(ckpt):
    edit_config(ckpt, lambda c: c["arch"].update(intermed_depth=3))
    refused(ckpt, WEIGHTS, f"tensor '{W_IN}' has shape [7, 16], the config predicts [15, 16]")


def test_shapes_disagree_with_config(ckpt):
    edit_config(ckpt, lambda c: c["arch"].update(hidden_size=32) or c["arch"]["embedding"].update(embedding_dim=32))
    refused(ckpt, WEIGHTS, "the config predicts [256, 32]")


def test_more_layers_in_config_than_in_file(ckpt):
    edit_config(ckpt, lambda c: c["arch"].update(num_transformer_layers=2))
    refused(ckpt, WEIGHTS, "missing tensor(s) encoder.layers.1.")


def test_missing_and_unexpected_tensors(ckpt):
    edit_header(ckpt / WEIGHTS, lambda h: h.update({"encoder.layers.7.extra": h.pop(W_IN)}))
    refused(ckpt, WEIGHTS, f"missing tensor(s) {W_IN}")


def test_unexpected_tensor(ckpt):
    header, data = read_st(ckpt / WEIGHTS)
    header["encoder.layers.1.norm1.weight"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    write_st(ckpt / WEIGHTS, header, data)
    refused(ckpt, WEIGHTS, "unexpected tensor(s) encoder.layers.1.norm1.weight (not part of a 1-layer checkpoint)")


def test_integer_weights(ckpt):
    edit_header(ckpt / WEIGHTS, _set(W_IN, "dtype", "I32"))
    refused(ckpt, WEIGHTS, f"tensor '{W_IN}' has dtype int32, expected a float type")


def test_untied_decoder(ckpt):
    header, data = read_st(ckpt / WEIGHTS)
    b, e = header["decoder.weight"]["data_offsets"]
    data = data[:b] + np.full((e - b) // 4, 0.5, "<f4").tobytes() + data[e:]
    write_st(ckpt / WEIGHTS, header, data)
    refused(ckpt, WEIGHTS, "'decoder.weight' differs from the word embedding; untied decoders are not supported")


def test_float16_and_float64_weights_are_converted(ckpt):
    """Other float types are valid: converted to float32 (the engine's one type)."""
    header, data = read_st(ckpt / WEIGHTS)
    out, off = {}, 0
    chunks = []
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__" else -1):
        if name == "__metadata__":
            continue
        a = np.frombuffer(data[e["data_offsets"][0]:e["data_offsets"][1]], "<f4")
        dt, code = ("<f8", "F64") if name.endswith("bias") else ("<f4", "F32")
        raw = a.astype(dt).tobytes()
        out[name] = {"dtype": code, "shape": e["shape"], "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    write_st(ckpt / WEIGHTS, out, b"".join(chunks))
    assert ufcpu.load(ckpt).encode("hello").dtype == np.float32


# --- NaN / inf on request ----------------------------------------------------------------------

W_OUT = "encoder.layers.0.ffn.linear_out.weight"
QKV = "encoder.layers.0.attn.self_attention.query_key_value.weight"


def poison(path: Path, name: str, flat: int, value: float) -> None:
    """Write value at flat index `flat` of tensor `name` (float32) in a safetensors file."""
    header, data = read_st(path)
    b = header[name]["data_offsets"][0] + 4 * flat
    write_st(path, header, data[:b] + np.float32(value).tobytes() + data[b + 4:])


@pytest.mark.parametrize("name,flat,value", [
    (W_IN, 1, float("nan")),
    ("encoder.final_norm.bias", 1, float("inf")),
    ("encoder.embedding.norm.weight", 1, float("-inf")),
    ("encoder.embedding.pos_embedding.scale_factor", 0, float("nan")),
    (W_OUT, 5, float("nan")),        # stored transposed in the engine: the position is the file's
    (QKV, 16 * 9 + 3, float("inf")),   # rows regrouped in the engine: the position is the file's
])
def test_nan_weights_refused_with_check(ckpt, name, flat, value):
    """--check names the user's own file, the tensor's name in it and the position in it."""
    poison(ckpt / WEIGHTS, name, flat, value)
    ufcpu.load(ckpt)                                   # without check: loads (the scan reads every byte)
    refused(ckpt, f"{ckpt / WEIGHTS}: tensor {name!r} holds NaN or inf values (first at flat index {flat}: ",
            check=True)


def test_nan_weights_in_classifier_head(cls_ckpt):
    poison(cls_ckpt / WEIGHTS, "head.bias", 0, float("nan"))
    refused(cls_ckpt, "tensor 'head.bias' holds NaN or inf values (first at flat index 0: nan)", check=True)


def test_nan_weights_in_an_engine_folder_are_named_by_engine_name(ckpt, tmp_path):
    """A converted folder loaded as it is: the engine file and its own tensor name."""
    poison(ckpt / WEIGHTS, W_OUT, 5, float("nan"))
    engine = convert(ckpt, tmp_path / "engine")
    h = json.loads((engine / "engine.json").read_text())
    assert h["tensors"]["layer.0.fff.w_out"] == W_OUT and h["source_weights"] == str(ckpt / WEIGHTS)
    # the file's [H=16, N=7] element 5 is row 0, column 5: the engine's [N, H] row 5, column 0
    refused(engine, f"{engine / 'engine.safetensors'}: tensor 'layer.0.fff.w_out' holds NaN or inf values "
            f"(first at flat index {5 * 16}: nan)", check=True)


# --- the converted (engine) folder -------------------------------------------------------------

@pytest.mark.parametrize("edit,words", [
    (lambda m: m.update(format="other"), ["not a ufcpu engine config"]),
    (lambda m: m.update(version=99), [f"engine format version 99, this ufcpu reads version {layout.VERSION}: "
                                      "convert the checkpoint again"]),
    (lambda m: m.update(version=1), ["engine format version 1, this ufcpu reads version"]),
    (lambda m: m.pop("config"), ["malformed engine config"]),
    (lambda m: m.update(config=[1]), ["malformed engine config"]),
    (lambda m: m["config"].update(bogus=1), ["malformed engine config", "bogus"]),
    (lambda m: m["config"].pop("layers"), ["malformed engine config", "layers"]),
    (lambda m: m["config"].update(layers="1"), ["layers must be a positive integer, got '1'"]),
    (lambda m: m["config"].update(depth=-1), ["depth must be an integer in 0..24, got -1"]),
    (lambda m: m["config"].update(depth=3), ["tensor 'layer.0.fff.w_in' is float32[7, 16], expected float32[15, 16]"]),
    (lambda m: m["config"].update(vocab=1000), ["tensor 'embed.word' is float32[256, 16], expected float32[1000, 16]"]),
    (lambda m: m["config"].update(heads=5), ["hidden size 16 is not divisible into 5 heads"]),
    (lambda m: m["config"].update(task="generation"), ["task 'generation' is not supported"]),
    (lambda m: m["config"].update(norm_eps=None), ["norm_eps must be a non-negative number"]),
    (lambda m: m["config"].update(id2label="x"), ["malformed engine config"]),
])
def test_engine_config_invalid(engine_dir, edit, words):
    edit_config(engine_dir, edit, name="engine.json")
    refused(engine_dir, "engine.json" if "tensor" not in words[0] else "engine.safetensors", *words)


def test_engine_config_not_json(engine_dir):
    (engine_dir / "engine.json").write_text("{")
    refused(engine_dir, str(engine_dir / "engine.json"), "not valid JSON")


def test_engine_weights_unaligned(engine_dir):
    p = engine_dir / "engine.safetensors"
    header, data = read_st(p)
    write_st(p, json.dumps(header).encode() + b"   ", data, align=False)   # header length 8k + 3
    assert (len(json.dumps(header)) + 3) % 4
    refused(engine_dir, str(p), "is not aligned to 4 bytes")


def test_engine_weights_truncated(engine_dir):
    p = engine_dir / "engine.safetensors"
    p.write_bytes(p.read_bytes()[:-4])
    refused(engine_dir, str(p), "lies outside the file")


# --- tokenizer.json ----------------------------------------------------------------------------

def edit_tokenizer(folder: Path, fn) -> None:
    edit_config(folder, fn, name="tokenizer.json")


def test_tokenizer_not_json(ckpt):
    (ckpt / "tokenizer.json").write_text("{oops")
    refused(ckpt, str(ckpt / "tokenizer.json"), "cannot read tokenizer")


def test_tokenizer_wrong_structure(ckpt):
    (ckpt / "tokenizer.json").write_text('{"model": 3}')
    refused(ckpt, str(ckpt / "tokenizer.json"), "cannot read tokenizer")


def test_tokenizer_is_a_folder(ckpt):
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.json").mkdir()
    refused(ckpt, "missing tokenizer.json")


@pytest.mark.parametrize("token", ["<mask>", "<pad>", "<sep>"])
def test_tokenizer_without_a_needed_special_token(ckpt, token):
    def drop(t):
        t["model"]["vocab"].pop(token)
        t["added_tokens"] = [a for a in t["added_tokens"] if a["content"] != token]
        t["post_processor"]["special_tokens"].pop(token, None)
        for key in ("single", "pair"):
            t["post_processor"][key] = [p for p in t["post_processor"][key]
                                        if p.get("SpecialToken", {}).get("id") != token]
    edit_tokenizer(ckpt, drop)
    refused(ckpt, str(ckpt / "tokenizer.json"), f"tokenizer has no {token} token")


def test_tokenizer_without_unknown_token(ckpt):
    def drop(t):
        t["model"]["vocab"].pop("<unk>")
        t["added_tokens"] = [a for a in t["added_tokens"] if a["content"] != "<unk>"]
    edit_tokenizer(ckpt, drop)
    refused(ckpt, str(ckpt / "tokenizer.json"), "the tokenizer fails on a probe text", "Missing [UNK] token")


def test_tokenizer_vocabulary_larger_than_embedding(ckpt):
    edit_tokenizer(ckpt, lambda t: t["model"]["vocab"].update({"zzzz": 300}))
    refused(ckpt, str(ckpt / "tokenizer.json"),
            "the tokenizer produces ids up to 300, the embedding has only 256 rows")


def test_tokenizer_post_processor_id_past_embedding(ckpt):
    edit_tokenizer(ckpt, lambda t: t["post_processor"]["special_tokens"]["<sep>"].update(ids=[5000]))
    refused(ckpt, "the tokenizer produces ids up to 5000, the embedding has only 256 rows")


def test_engine_folder_tokenizer_past_embedding(engine_dir):
    """Edited after conversion: the engine checks again at load (ids past the embedding would index
    out of bounds)."""
    edit_tokenizer(engine_dir, lambda t: t["model"]["vocab"].update({"zzzz": 999}))
    refused(engine_dir, str(engine_dir / "tokenizer.json"),
            "the tokenizer produces ids up to 999, the embedding has only 256 rows (vocab)")


def test_config_vocab_smaller_than_tokenizer(ckpt):
    edit_config(ckpt, lambda c: c["arch"]["embedding"].update(vocab_size=200))
    refused(ckpt, "produces ids up to 255, the embedding has only 200 rows (arch.embedding.vocab_size)")


# --- conversion output -------------------------------------------------------------------------

def test_convert_refuses_to_replace_a_foreign_folder(ckpt, tmp_path):
    dst = tmp_path / "precious"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(CacheError, match="exists and is not an engine folder; refusing to replace it"):
        convert(ckpt, dst)
    assert (dst / "keep.txt").read_text() == "mine"


def test_convert_leaves_no_partial_folder_on_error(ckpt, tmp_path):
    (ckpt / WEIGHTS).write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError):
        convert(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# --- the command line: exit 2, one line naming the file ----------------------------------------

def _cli_cases():
    return {
        "truncated": (lambda c: (c / WEIGHTS).write_bytes((c / WEIGHTS).read_bytes()[:-100]),
                      [WEIGHTS, "lies outside the file"]),
        "not-json": (lambda c: (c / "config.json").write_text("nope"), ["config.json", "not valid JSON"]),
        "parallel-trees": (lambda c: edit_config(c, lambda d: d["arch"].update(intermed_size=2)),
                           ["several parallel trees"]),
        "depth": (lambda c: edit_config(c, lambda d: d["arch"].update(intermed_depth=5)),
                  ["the config predicts [63, 16]"]),
        "bad-dtype": (lambda c: edit_header(c / WEIGHTS, _set(W_IN, "dtype", "F8_E5M2")), ["unsupported dtype"]),
        "tokenizer": (lambda c: (c / "tokenizer.json").write_text("[]"), ["tokenizer.json", "cannot read tokenizer"]),
    }


@pytest.mark.parametrize("case", sorted(_cli_cases()))
def test_cli_one_line(ckpt, case):
    corrupt, words = _cli_cases()[case]
    corrupt(ckpt)
    _, err, code = run("encode", "-m", str(ckpt), "x", ok=False)
    assert_one_line_error(err, code, "ufcpu: error:", *words)


def test_cli_check_flag(ckpt):
    header, data = read_st(ckpt / WEIGHTS)
    b = header[W_IN]["data_offsets"][0]
    write_st(ckpt / WEIGHTS, header, data[:b] + np.float32("nan").tobytes() + data[b + 4:])
    out, _, _ = run("encode", "-m", str(ckpt), "x")        # without --check it runs
    assert len(json.loads(out)) == 1
    _, err, code = run("encode", "--check", "-m", str(ckpt), "x", ok=False)
    assert_one_line_error(err, code, f"{ckpt / WEIGHTS}: tensor '{W_IN}' holds NaN or inf values")
