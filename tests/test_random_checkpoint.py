"""The random-checkpoint writer must produce what the Hub (and the reference fixtures) contain:
same files, JSON structure, tensor names/shapes/dtypes and tokenizer pipeline. Small sizes only."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from weights_convert.random_checkpoint import (
    POOLERS, SPECIAL_TOKENS, _resolve_special_order, build_vocab, main, tensor_specs, write_random_checkpoint,
)

DATA = Path(__file__).parent / "data"
SMALL = dict(layers=2, hidden=64, heads=2, depth=3, vocab=512)
# The fixtures' dims, used to turn a fixture's shapes into the ones predicted for SMALL.
FIXTURE_DIMS = dict(layers=2, hidden=128, heads=2, depth=7, vocab=2048)
SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs back home."


def _dim_map(src: dict, dst: dict, head_dim=(1024, 1024), labels=(2, 2)) -> dict[int, int]:
    """Fixture dim value -> our dim value (V, H, 3H, nodes, head_dim, labels)."""
    def dims(d):
        return [d["vocab"], d["hidden"], 3 * d["hidden"], 2 ** (d["depth"] + 1) - 1]
    pairs = dict(zip(dims(src), dims(dst)))
    pairs.update({head_dim[0]: head_dim[1], labels[0]: labels[1], 1: 1})
    return pairs


def _shapes(path: Path) -> dict[str, tuple[tuple, str]]:
    """name -> (shape, safetensors dtype) straight from the file header."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items()}


def _keys(d):
    """Recursive key structure of a JSON object."""
    return {k: _keys(v) for k, v in d.items()} if isinstance(d, dict) else None


@pytest.fixture(scope="module")
def mlm(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("mlm") / "ckpt", **SMALL, seed=1)


@pytest.fixture(scope="module")
def cls(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("cls") / "ckpt", **SMALL, seed=1,
                                   task="classification", num_labels=3, pooler="max", head_dim=32)


# ---- files and tensors -------------------------------------------------------------------------

@pytest.mark.parametrize("which, fixture", [("mlm", "tiny-ufb"), ("cls", "tiny-ufb-cls")])
def test_file_list_matches_fixture(which, fixture, request):
    ours = sorted(p.name for p in request.getfixturevalue(which).iterdir())
    ref = sorted(p.name for p in (DATA / fixture).iterdir() if p.name != "expected.npz")
    assert ours == ref


def test_mlm_tensors_match_fixture_after_substituting_dims(mlm):
    ours, ref = _shapes(mlm / "model.safetensors"), _shapes(DATA / "tiny-ufb" / "model.safetensors")
    sub = _dim_map(FIXTURE_DIMS, SMALL)
    assert set(ours) == set(ref)
    assert len(ours) == 7 + 10 * SMALL["layers"]
    for name, (shape, dtype) in ref.items():
        assert ours[name] == (tuple(sub[d] for d in shape), "F32"), name


def test_cls_tensors_match_fixture_after_substituting_dims(cls):
    ours, ref = _shapes(cls / "model.safetensors"), _shapes(DATA / "tiny-ufb-cls" / "model.safetensors")
    sub = _dim_map(FIXTURE_DIMS, SMALL, head_dim=(1024, 32), labels=(2, 3))
    assert set(ours) == set(ref)
    assert "decoder.weight" not in ours
    for name, (shape, dtype) in ref.items():
        assert ours[name] == (tuple(sub[d] for d in shape), "F32"), name


def test_full_size_specs_match_model_md():
    specs = tensor_specs(layers=16, hidden=768, heads=12, depth=11, vocab=32768)
    assert len(specs) == 167
    assert specs["encoder.layers.15.ffn.linear_in.weight"][0] == (4095, 768)
    assert specs["encoder.layers.0.ffn.linear_out.weight"][0] == (768, 4095)
    assert specs["encoder.layers.3.attn.self_attention.query_key_value.weight"][0] == (2304, 768)
    assert specs["encoder.layers.3.attn.self_attention.norm_factor"] == ((), 0.125)
    assert specs["decoder.weight"][0] == (32768, 768)
    nbytes = sum(4 * math.prod(shape) for shape, _ in specs.values())
    assert 750e6 < nbytes < 760e6  # "755 MB, all F32"


def test_tensor_values(mlm):
    t = load_file(mlm / "model.safetensors")
    np.testing.assert_array_equal(t["decoder.weight"], t["encoder.embedding.word_embedding.weight"])
    nf = t["encoder.layers.1.attn.self_attention.norm_factor"]
    assert nf.shape == () and nf == np.float32(1 / math.sqrt(SMALL["hidden"] // SMALL["heads"]))
    assert t["encoder.embedding.pos_embedding.scale_factor"].shape == (1,)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in t.values())
    w = t["encoder.layers.0.ffn.linear_in.weight"]
    assert abs(w.std() - 1 / math.sqrt(SMALL["hidden"])) < 0.02  # fixtures' 1/sqrt(fan_in) scale
    assert abs(t["encoder.layers.0.norm1.weight"].mean() - 1) < 0.1
    assert t["encoder.layers.0.ffn.linear_in.bias"].std() > 0.1  # biases are not all zero


def test_streamed_file_equals_safetensors_own_writer(mlm, tmp_path):
    ref = tmp_path / "ref.safetensors"
    save_file(load_file(mlm / "model.safetensors"), str(ref), metadata={"format": "pt"})
    assert ref.read_bytes() == (mlm / "model.safetensors").read_bytes()
    with safe_open(str(mlm / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}


def test_no_ff_layer_omits_pooler_dense(tmp_path):
    d = write_random_checkpoint(tmp_path / "c", **SMALL, task="classification", include_ff_layer=False)
    shapes = _shapes(d / "model.safetensors")
    assert not any(k.startswith("pooler.") for k in shapes)
    assert shapes["head.weight"][0] == (2, SMALL["hidden"])
    assert json.loads((d / "config.json").read_text())["arch"]["classification_head"]["include_ff_layer"] is False


# ---- configs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("which, fixture", [("mlm", "tiny-ufb"), ("cls", "tiny-ufb-cls")])
def test_config_keys_match_fixture(which, fixture, request):
    d = request.getfixturevalue(which)
    for name in ("config.json", "model_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        ours = json.loads((d / name).read_text())
        ref = json.loads((DATA / fixture / name).read_text())
        assert _keys(ours) == _keys(ref), name


def test_config_values(mlm, cls):
    m = json.loads((mlm / "config.json").read_text())
    a = m["arch"]
    assert m["architectures"] == ["ScriptableLMForPreTraining"] and m["model_type"] == "crammedBERT"
    assert (a["num_transformer_layers"], a["hidden_size"], a["attention"]["num_attention_heads"],
            a["intermed_depth"], a["embedding"]["vocab_size"]) == tuple(SMALL.values())
    assert a["embedding"]["embedding_dim"] == SMALL["hidden"] and a["num_labels"] is None
    c = json.loads((cls / "config.json").read_text())
    assert c["architectures"] == ["ScriptableLMForSequenceClassification"]
    assert c["arch"]["num_labels"] == 3
    assert c["arch"]["classification_head"] == {"classifier_dropout": 0.1, "head_dim": 32,
                                                "include_ff_layer": True, "nonlin": "Tanh", "pooler": "max"}


@pytest.mark.parametrize("pooler", POOLERS)
def test_classification_each_pooler(pooler, tmp_path):
    d = write_random_checkpoint(tmp_path / pooler, layers=1, hidden=16, heads=2, depth=2, vocab=256,
                                task="classification", pooler=pooler, head_dim=8)
    assert json.loads((d / "config.json").read_text())["arch"]["classification_head"]["pooler"] == pooler
    assert _shapes(d / "model.safetensors")["head.weight"] == ((2, 8), "F32")


def test_json_files_byte_identical_to_fixture_with_its_dims(tmp_path):
    """With the fixture's sizes and special order, every JSON file but the vocab matches exactly."""
    order = [t["content"] for t in json.loads((DATA / "tiny-ufb" / "tokenizer.json").read_text())["added_tokens"]]
    d = write_random_checkpoint(tmp_path / "t", **FIXTURE_DIMS, special_order=order)
    for name in ("config.json", "model_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (d / name).read_bytes() == (DATA / "tiny-ufb" / name).read_bytes(), name
    ours = json.loads((d / "tokenizer.json").read_text())
    ref = json.loads((DATA / "tiny-ufb" / "tokenizer.json").read_text())
    assert len(ours["model"].pop("vocab")) == len(ref["model"].pop("vocab")) == 2048
    assert ours == ref


# ---- tokenizer ---------------------------------------------------------------------------------

def test_tokenizer_specials_match_tokenizer_config(mlm):
    tok = Tokenizer.from_file(str(mlm / "tokenizer.json"))
    assert tok.get_vocab_size() == SMALL["vocab"]
    decoder = json.loads((mlm / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert sorted(v["content"] for v in decoder.values()) == sorted(SPECIAL_TOKENS)
    for i, entry in decoder.items():
        assert tok.token_to_id(entry["content"]) == int(i)
    assert json.loads((mlm / "tokenizer_config.json").read_text())["model_max_length"] == 128


def test_mask_round_trips(mlm):
    tok = Tokenizer.from_file(str(mlm / "tokenizer.json"))
    mask = tok.token_to_id("<mask>")
    assert tok.id_to_token(mask) == "<mask>"
    enc = tok.encode("the <mask> sat down")
    assert enc.ids.count(mask) == 1
    assert "<mask>" in tok.decode(enc.ids, skip_special_tokens=False)


def test_english_tokenizes_to_real_pieces(mlm):
    tok = Tokenizer.from_file(str(mlm / "tokenizer.json"))
    enc = tok.encode(SENTENCE)
    unk = tok.token_to_id("<unk>")
    assert len(enc.ids) > 3 and enc.ids.count(unk) <= 1
    assert tok.decode(enc.ids) == SENTENCE.lower()


def test_post_processor_single_and_pair(mlm):
    tok = Tokenizer.from_file(str(mlm / "tokenizer.json"))
    single = tok.encode("hello world").tokens
    assert single[-1] == "<sep>" and "<cls>" not in single
    a, b = tok.encode("hello", add_special_tokens=False).tokens, tok.encode("world", add_special_tokens=False).tokens
    assert tok.encode("hello", "world").tokens == ["<cls>", *a, "<sep>", *b, "<sep>"]


def test_special_order_shuffled_by_seed_or_given():
    given = ["<pad>", "<mask>", "<cls>", "<sep>", "<unk>", "</s>", "<s>"]
    assert list(build_vocab(150, given))[:7] == given
    shuffled = {tuple(_resolve_special_order(None, s)) for s in range(8)}
    assert len(shuffled) > 1 and all(sorted(o) == sorted(SPECIAL_TOKENS) for o in shuffled)
    with pytest.raises(ValueError):
        _resolve_special_order(["<unk>"] * 7, 0)


def test_vocab_exact_and_unique():
    for n in (143, 512, 5000):
        v = build_vocab(n, SPECIAL_TOKENS)
        assert len(v) == n and sorted(v.values()) == list(range(n))
    with pytest.raises(ValueError):
        build_vocab(100, SPECIAL_TOKENS)


# ---- determinism, errors, command line ---------------------------------------------------------

def test_same_seed_same_bytes_different_seed_differs(mlm, tmp_path):
    again = write_random_checkpoint(tmp_path / "again", **SMALL, seed=1)
    other = write_random_checkpoint(tmp_path / "other", **SMALL, seed=2)
    for p in mlm.iterdir():
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name
    assert (other / "model.safetensors").read_bytes() != (mlm / "model.safetensors").read_bytes()


@pytest.mark.parametrize("bad", [dict(hidden=63), dict(heads=3), dict(task="qa"), dict(pooler="sum"),
                                 dict(vocab=50)])
def test_bad_arguments_refused(bad, tmp_path):
    with pytest.raises(ValueError):
        write_random_checkpoint(tmp_path / "x", **{**SMALL, **bad})
    assert not (tmp_path / "x").exists()


def test_command_line(tmp_path, capsys):
    dst = tmp_path / "cli"
    assert main([str(dst), "--layers", "1", "--hidden", "16", "--heads", "2", "--depth", "2", "--vocab", "200",
                 "--seed", "3", "--task", "classification", "--num-labels", "4", "--pooler", "lse"]) == 0
    err = capsys.readouterr().err
    assert str(dst) in err and "MB" in err
    assert _shapes(dst / "model.safetensors")["head.weight"][0] == (4, 1024)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--full", "--layers", "2"])
