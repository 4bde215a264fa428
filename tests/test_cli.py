"""The real `ufcpu` command, run as a subprocess on the fixtures: every output format, stdin,
errors (exit code 2, one line on stderr, no traceback)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import DATA, load_fixture, texts_of

MODEL = str(DATA / "tiny-ufb")
CLS = str(DATA / "tiny-ufb-cls")


def run(*args, stdin: bytes | None = None, ok: bool = True):
    """-> (stdout str, stderr str, returncode). The script entry point is the installed one."""
    env = dict(os.environ)
    p = subprocess.run([sys.executable, "-m", "ufcpu.cli", *args], input=stdin,
                       capture_output=True, env=env, timeout=300)
    out, err = p.stdout.decode(), p.stderr.decode()
    if ok:
        assert p.returncode == 0, err
    return out, err, p.returncode


def assert_one_line_error(err: str, code: int, *words: str):
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


def test_console_script_installed():
    p = subprocess.run(["ufcpu", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("ufcpu ")


def test_python_dash_m_runs_the_command():
    p = subprocess.run([sys.executable, "-m", "ufcpu", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("ufcpu ")


def test_encode_json_matches_library():
    texts = ["hello world", "fast feedforward"]
    out, _, _ = run("encode", "-m", MODEL, *texts)
    got = np.array(json.loads(out), np.float32)
    np.testing.assert_allclose(got, load_fixture("tiny-ufb").encode(texts), atol=1e-6)


def test_encode_jsonl_and_options():
    out, _, _ = run("encode", "-m", MODEL, "--format", "jsonl", "--normalize", "--pooling", "first", "a b", "c")
    rows = [json.loads(l) for l in out.splitlines()]
    assert [r["text"] for r in rows] == ["a b", "c"]
    ref = load_fixture("tiny-ufb").encode(["a b", "c"], pooling="first", normalize=True)
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), ref, atol=1e-6)
    assert abs(np.linalg.norm(rows[0]["embedding"]) - 1) < 1e-5


def test_encode_pooling_none_json():
    out, _, _ = run("encode", "-m", MODEL, "--pooling", "none", "one two three")
    (tokens,) = json.loads(out)
    ref = load_fixture("tiny-ufb").encode("one two three", pooling="none")
    np.testing.assert_allclose(np.array(tokens), ref, atol=1e-6)


def test_encode_stdin_to_npy(tmp_path):
    texts = texts_of("tiny-ufb")
    dst = tmp_path / "out.npy"
    _, err, _ = run("encode", "-m", MODEL, "--format", "npy", "-o", str(dst), "--batch-size", "2",
                    stdin="\n".join(texts).encode() + b"\n")
    arr = np.load(dst, mmap_mode="r")
    assert arr.dtype == np.float32 and arr.shape == (len(texts), 128)
    np.testing.assert_allclose(arr, load_fixture("tiny-ufb").encode(texts), atol=1e-5)
    assert "truncated" in err     # one text is longer than 128 tokens


def test_encode_stdin_invalid_utf8_is_replaced_and_said():
    out, err, _ = run("encode", "-m", MODEL, stdin=b"ok line\nbad \xff\xfe bytes\n")
    assert len(json.loads(out)) == 2
    assert "not valid UTF-8" in err


def test_fill_mask_json():
    out, _, _ = run("fill-mask", "-m", MODEL, "--top-k", "3", "the capital of france is [MASK].")
    preds = json.loads(out)
    assert len(preds) == 3 and set(preds[0]) == {"score", "token", "token_str", "sequence"}
    assert preds == load_fixture("tiny-ufb").fill_mask("the capital of france is <mask>.", top_k=3)


def test_classify_texts_and_pairs():
    out, _, _ = run("classify", "-m", CLS, "short", "another text")
    preds = json.loads(out)
    ref = load_fixture("tiny-ufb-cls").predict(["short", "another text"])
    assert [p["label"] for p in preds] == [p["label"] for p in ref]
    np.testing.assert_allclose([p["probabilities"] for p in preds], [p["probabilities"] for p in ref], atol=1e-6)
    out, _, _ = run("classify", "-m", CLS, "--pair", "--format", "jsonl", stdin=b"first\tsecond\n")
    row = json.loads(out)
    assert row["text"] == ["first", "second"]


def test_info_and_warmup():
    out, _, _ = run("info", "-m", MODEL)
    info = json.loads(out)
    assert info["config"]["layers"] == 2 and info["config"]["depth"] == 7
    assert info["threads"]["kernels"] >= 1
    _, err, _ = run("warmup")
    assert "kernels ready" in err


def test_convert_then_load_engine_folder(tmp_path):
    dst = tmp_path / "engine"
    out, _, _ = run("convert", MODEL, str(dst))
    assert (dst / "engine.json").is_file() and (dst / "tokenizer.json").is_file()
    out, _, _ = run("encode", "-m", str(dst), "hello")
    np.testing.assert_allclose(np.array(json.loads(out))[0], load_fixture("tiny-ufb").encode("hello"), atol=1e-6)


@pytest.mark.parametrize("args,words", [
    (["encode", "-m", MODEL, "--batch-size", "0", "x"], ["--batch-size", "positive integer"]),
    (["encode", "-m", MODEL, "--threads", "-1", "x"], ["--threads"]),
    (["fill-mask", "-m", MODEL, "--top-k", "0", "x <mask>"], ["--top-k"]),
    (["fill-mask", "-m", MODEL, "no mask here"], ["no mask token"]),
    (["encode", "-m", "/no/such/folder", "x"], ["/no/such/folder"]),
    (["encode", "-m", MODEL, "--format", "npy", "x"], ["-o FILE"]),
    (["encode", "-m", MODEL, "--format", "yaml", "x"], ["--format"]),
    (["classify", "-m", MODEL, "x"], ["classification checkpoint"]),
    (["fill-mask", "-m", CLS, "x <mask>"], ["mlm checkpoint"]),
    (["classify", "-m", CLS, "--pair", "no tab here"], ["tab"]),
    (["encode", "-m", str(DATA), "x"], ["neither a Hub-layout checkpoint"]),
    (["bogus"], ["invalid choice"]),
])
def test_errors_are_one_line(args, words):
    _, err, code = run(*args, ok=False)
    assert_one_line_error(err, code, *words)


def test_unwritable_output_is_one_line(tmp_path):
    _, err, code = run("encode", "-m", MODEL, "-o", str(tmp_path / "no" / "dir" / "x.json"), "x", ok=False)
    assert_one_line_error(err, code, "x.json")
