"""Write a random UltraFastBERT checkpoint in exactly the Hub layout of pbelcak/UltraFastBERT-1x11-long.

Why: the engine, its benchmarks and its tests need checkpoints of any size (including the full
16 x 768, depth-11 model) without network access and without torch. The files mirror the Hub's
names, JSON structure, tensor names/shapes/dtypes and tokenizer pipeline, so a loader that reads
these reads the real checkpoint; only the numbers are random.

Weights imitate the reference fixtures' statistics (tests/data/*-ufb), which were made by the
reference implementation's own initialisation: word embedding N(0, 1), every Linear weight
N(0, 1/fan_in), LayerNorm weight 1 + N(0, 0.2^2) and bias N(0, 0.2^2), FFF input bias N(0, 0.3^2),
positional scale 0.5, attention norm_factor 1/sqrt(head size). With these, FFF logits are O(1) and
tokens take real, varied routes through the tree.

Every tensor is drawn from its own stream seeded by (seed, tensor name), so values do not depend on
write order, and the safetensors file is streamed tensor by tensor (peak memory: one embedding).

Special-token ids: the seven specials take ids 0-6 in an order that differs between checkpoints
(the real checkpoint's order is not known here); by default the order is shuffled by the seed.
Readers must always take special ids from tokenizer.json, never hard-code them.

Command line:
    python -m weights_convert.random_checkpoint DST [--full | --layers N --hidden H --heads A
        --depth D --vocab V] [--seed S] [--task mlm|classification] [--num-labels C] [--pooler P]
Dimensions not given take the Hub model's values, so `DST` alone (or `DST --full`) writes the full
755 MB model.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import string
import sys
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = ["write_random_checkpoint", "SPECIAL_TOKENS", "main"]

SPECIAL_TOKENS = ("<unk>", "<cls>", "<s>", "</s>", "<mask>", "<sep>", "<pad>")
POOLERS = ("zero_index", "avg", "max", "lse")
TASK_ARCHITECTURE = {
    "mlm": "ScriptableLMForPreTraining",
    "classification": "ScriptableLMForSequenceClassification",
}

# ----------------------------------------------------------------------------------------------
# Tensors: a name -> (shape, init) table, then a streaming safetensors writer.
# ----------------------------------------------------------------------------------------------

# init kind -> (mean, std); "fan_in" std means 1/sqrt(shape[-1]) (torch Linear-like, as the fixtures).
INITS = {
    "embedding": (0.0, 1.0),
    "linear": (0.0, "fan_in"),
    "ln_weight": (1.0, 0.2),
    "ln_bias": (0.0, 0.2),
    "emb_ln_bias": (0.0, 0.1),
    "fff_bias": (0.0, 0.3),
    "pooler_bias": (0.0, 0.1),
    "head_bias": (0.0, 0.1),
}
POS_SCALE = 0.5  # the fixtures' encoder.embedding.pos_embedding.scale_factor


def _layer_specs(i: int, hidden: int, heads: int, nodes: int) -> list[tuple[str, tuple, object]]:
    """The ten tensors of transformer layer i (names exactly as on the Hub)."""
    p = f"encoder.layers.{i}."
    return [
        (p + "norm1.weight", (hidden,), "ln_weight"),
        (p + "norm1.bias", (hidden,), "ln_bias"),
        (p + "attn.self_attention.query_key_value.weight", (3 * hidden, hidden), "linear"),
        (p + "attn.self_attention.norm_factor", (), 1.0 / math.sqrt(hidden // heads)),
        (p + "attn.dense.weight", (hidden, hidden), "linear"),
        (p + "norm2.weight", (hidden,), "ln_weight"),
        (p + "norm2.bias", (hidden,), "ln_bias"),
        (p + "ffn.linear_in.weight", (nodes, hidden), "linear"),
        (p + "ffn.linear_in.bias", (nodes,), "fff_bias"),
        (p + "ffn.linear_out.weight", (hidden, nodes), "linear"),
    ]


def _head_specs(task: str, vocab: int, hidden: int, num_labels: int,
                include_ff_layer: bool, head_dim: int) -> list[tuple[str, tuple, object]]:
    """Task-specific tensors: the tied MLM decoder, or the classifier's pooler dense and head."""
    if task == "mlm":
        return [("decoder.weight", (vocab, hidden), "tied")]
    dense = [("pooler.dense.weight", (head_dim, hidden), "linear"),
             ("pooler.dense.bias", (head_dim,), "pooler_bias")] if include_ff_layer else []
    head_in = head_dim if include_ff_layer else hidden
    return dense + [("head.weight", (num_labels, head_in), "linear"),
                    ("head.bias", (num_labels,), "head_bias")]


def tensor_specs(*, layers: int, hidden: int, heads: int, depth: int, vocab: int, task: str = "mlm",
                 num_labels: int = 2, include_ff_layer: bool = True, head_dim: int = 1024,
                 ) -> dict[str, tuple[tuple, object]]:
    """Every tensor of the checkpoint: name -> (shape, init kind or constant value), sorted by name
    (the order safetensors stores them in)."""
    nodes = 2 ** (depth + 1) - 1
    specs = [
        ("encoder.embedding.word_embedding.weight", (vocab, hidden), "embedding"),
        ("encoder.embedding.pos_embedding.scale_factor", (1,), POS_SCALE),
        ("encoder.embedding.norm.weight", (hidden,), "ln_weight"),
        ("encoder.embedding.norm.bias", (hidden,), "emb_ln_bias"),
        ("encoder.final_norm.weight", (hidden,), "ln_weight"),
        ("encoder.final_norm.bias", (hidden,), "ln_bias"),
    ]
    for i in range(layers):
        specs += _layer_specs(i, hidden, heads, nodes)
    specs += _head_specs(task, vocab, hidden, num_labels, include_ff_layer, head_dim)
    return {name: (shape, init) for name, shape, init in sorted(specs)}


def _rng_for(seed: int, name: str) -> np.random.Generator:
    """An independent stream per (seed, tensor name): values do not depend on generation order."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(zlib.crc32(name.encode()),)))


def _make_tensor(seed: int, name: str, shape: tuple, init: object) -> np.ndarray:
    """Draw one float32 tensor (in float32 directly: no float64 temporaries at full size)."""
    if not isinstance(init, str):
        return np.full(shape, init, dtype=np.float32)
    mean, std = INITS[init]
    if std == "fan_in":
        std = 1.0 / math.sqrt(shape[-1])
    arr = _rng_for(seed, name).standard_normal(shape, dtype=np.float32)
    arr *= np.float32(std)
    if mean:
        arr += np.float32(mean)
    return arr


def _safetensors_header(specs: dict[str, tuple[tuple, object]]) -> bytes:
    """The header safetensors itself writes (same bytes as safetensors.numpy.save_file with
    metadata {"format": "pt"}): compact JSON, tensors sorted by name, space-padded to 8 bytes."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, _) in specs.items():
        nbytes = 4 * math.prod(shape)
        entries[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def write_safetensors(path: Path, specs: dict[str, tuple[tuple, object]], seed: int) -> None:
    """Stream the tensors to disk one at a time; the tied decoder reuses the word embedding."""
    embedding_name = "encoder.embedding.word_embedding.weight"
    embedding = _make_tensor(seed, embedding_name, *specs[embedding_name])
    with open(path, "wb") as f:
        f.write(_safetensors_header(specs))
        for name, (shape, init) in specs.items():
            arr = embedding if init in ("tied", "embedding") else _make_tensor(seed, name, shape, init)
            f.write(np.ascontiguousarray(arr, dtype="<f4").data)


# ----------------------------------------------------------------------------------------------
# Configs: the fixtures' config.json / model_config.json structure.
# ----------------------------------------------------------------------------------------------

def _arch(*, layers: int, hidden: int, heads: int, depth: int, vocab: int | None, max_seq: int,
          num_labels: int | None, pooler: str, include_ff_layer: bool, head_dim: int) -> dict:
    """crammedBERT's hydra `arch` config, keys in the training config's own order (model_config.json
    keeps this order; config.json sorts it)."""
    return {
        "architectures": ["ScriptableCrammedBERT"], "num_transformer_layers": layers,
        "intermed_type": "fff", "hidden_size": hidden, "intermed_size": 1, "intermed_depth": depth,
        "hidden_dropout_prob": 0.1, "norm": "LayerNorm", "norm_eps": 1e-12, "norm_scheme": "pre",
        "nonlin": "GELU", "tie_weights": True, "decoder_bias": False, "sparse_prediction": 0.25,
        "loss": "cross-entropy", "objective_layout": "MLM",
        "embedding": {"vocab_size": vocab, "pos_embedding": "scaled-sinusoidal", "dropout_prob": 0.1,
                      "pad_token_id": 0, "max_seq_length": max_seq, "embedding_dim": hidden,
                      "normalization": True, "stable_low_precision": False},
        "attention": {"type": "self-attention", "causal_attention": False, "num_attention_heads": heads,
                      "dropout_prob": 0.1, "skip_output_projection": False, "qkv_bias": False,
                      "rotary_embedding": False, "seq_op_in_fp32": False, "sequence_op": "torch-softmax"},
        "init": {"type": "normal", "std": 0.02}, "ffn_layer_frequency": 1, "skip_head_transform": True,
        "use_bias": False, "final_norm": True, "num_labels": num_labels,
        "classification_head": {"pooler": pooler, "include_ff_layer": include_ff_layer,
                                "head_dim": head_dim, "nonlin": "Tanh", "classifier_dropout": 0.1},
    }


def _config_json(task: str, arch: dict) -> dict:
    """The HF-style config.json wrapping `arch` (as on the Hub and in the fixtures)."""
    return {"arch": arch, "architectures": [TASK_ARCHITECTURE[task]], "model_type": "crammedBERT",
            "torch_dtype": "float32", "transformers_version": "4.46.3"}


# ----------------------------------------------------------------------------------------------
# Tokenizer: a WordPiece vocabulary that makes English text into plausible multi-token sequences.
# ----------------------------------------------------------------------------------------------

COMMON_WORDS = """
the of and to a in is it you that he was for on are with as i his they be at one have this from or
had by not word but what some we can out other were all there when up use your how said an each she
which do their time if will way about many then them write would like so these her long make thing
see him two has look more day could go come did number sound no most people my over know water than
call first who may down side been now find any new work part take get place made live where after
back little only round man year came show every good me give our under name very through just form
sentence great think say help low line differ turn cause much mean before move right boy old too same
tell does set three want air well also play small end put home read hand port large spell add even
land here must big high such follow act why ask men change went light kind off need house picture try
us again animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye never last
let thought city tree cross farm hard start might story saw far sea draw left late run while press
close night real life few north open seem together next white children begin got walk example ease
paper group always music those both mark often letter until mile river car feet care second book carry
took science eat room friend began idea fish mountain stop once base hear horse cut sure watch color
face wood main enough plain girl usual young ready above ever red list though feel talk bird soon body
dog family direct pose leave song measure door product black short numeral class wind question happen
complete ship area half rock order fire south problem piece told knew pass since top whole king space
heard best hour better true during hundred five remember step early hold west ground interest reach
fast verb sing listen six table travel less morning ten simple several vowel toward war lay against
pattern slow center love person money serve appear road map rain rule govern pull cold notice voice
unit power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field
rest correct able pound done beauty drive stood contain front teach week final gave green oh quick
develop ocean warm free minute strong special mind behind clear tail produce fact street inch multiply
nothing course stay wheel full force blue object decide surface deep moon island foot system busy test
record boat common gold possible plane stead dry wonder laugh thousand ago ran check game shape equate
hot miss brought heat snow tire bring yes distant fill east paint language among model engine fast
token text network layer tree neural inference language computer data speed quick brown fox jumps lazy
""".split()

PREFIXES = "un re in dis en non over mis sub pre inter fore de trans super semi anti mid under".split()
SUFFIXES = ("s es ed ing ly er est ion tion sion ness ment ful less able ible al ial ous ive ity ty ize "
            "ise ist ism ance ence ant ent ary ery ory ure age ship hood ward wise like y ie ic ical").split()
ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y",
          "z", "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "sc", "sh", "sk",
          "sl", "sm", "sn", "sp", "st", "str", "sw", "th", "tr", "wh", "qu", "ph", "kn", "wr")
NUCLEI = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oa", "oo", "ou", "y", "au", "oi")
CODAS = ("", "b", "ck", "d", "ft", "g", "k", "l", "ld", "ll", "lt", "m", "mp", "n", "nd", "ng", "nk",
         "nt", "p", "r", "rd", "rn", "rt", "s", "sh", "ss", "st", "t", "th", "x", "ch", "ct", "pt", "rm")


def _base_alphabet() -> list[str]:
    """Every character the normalizer can leave (lowercase ASCII letters, digits, punctuation), so
    no ASCII text ever maps to <unk>."""
    return sorted(set(string.ascii_lowercase + string.digits + string.punctuation))


def _syllables() -> Iterator[str]:
    """Pronounceable onset+nucleus+coda pieces: a cheap stand-in for learned word pieces."""
    for onset, nucleus, coda in itertools.product(ONSETS, NUCLEI, CODAS):
        yield onset + nucleus + coda


def _piece_candidates() -> Iterator[str]:
    """Vocabulary entries after the alphabet, most useful first: whole words, affixes, syllables
    (both word-initial and `##` continuations), then two-syllable pieces without end."""
    yield from COMMON_WORDS
    yield from ("##" + s for s in SUFFIXES)
    yield from PREFIXES
    yield from (w + s for w in COMMON_WORDS for s in ("s", "ed", "ing"))
    for syl in _syllables():
        yield syl
        yield "##" + syl
    for a, b in itertools.product(_syllables(), repeat=2):
        yield a + b
        yield "##" + a + b


def build_vocab(vocab: int, special_order: Sequence[str]) -> dict[str, int]:
    """Exactly `vocab` unique entries: the specials at ids 0-6, the alphabet and its `##` forms,
    then pieces from _piece_candidates()."""
    alphabet = _base_alphabet()
    fixed = list(special_order) + alphabet + ["##" + c for c in alphabet]
    if vocab < len(fixed):
        raise ValueError(f"vocab={vocab} is too small: need at least {len(fixed)} entries "
                         "(7 specials and the ASCII alphabet with its ## forms)")
    tokens = dict.fromkeys(fixed)
    for piece in _piece_candidates():
        if len(tokens) >= vocab:
            break
        tokens.setdefault(piece)
    return {tok: i for i, tok in enumerate(tokens)}


def _resolve_special_order(special_order: Sequence[str] | None, seed: int) -> list[str]:
    """The given order (checked to be a permutation of SPECIAL_TOKENS) or a seed-shuffled one:
    the real checkpoint's order is unknown, and varying it keeps readers honest."""
    if special_order is None:
        order = list(SPECIAL_TOKENS)
        _rng_for(seed, "special_order").shuffle(order)
        return order
    if sorted(special_order) != sorted(SPECIAL_TOKENS):
        raise ValueError(f"special_order must be a permutation of {SPECIAL_TOKENS}, got {special_order!r}")
    return list(special_order)


def build_tokenizer(vocab: dict[str, int], special_order: Sequence[str]):
    """The Hub tokenizer pipeline (normalizer, Whitespace, `$A <sep>` / `<cls> $A <sep> $B <sep>`,
    WordPiece decoder) around our vocabulary; with the fixtures' vocabularies this reproduces their
    tokenizer.json byte for byte."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, processors
    from tokenizers import normalizers as norm
    from tokenizers import pre_tokenizers

    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = norm.Sequence([
        norm.Replace("``", '"'), norm.Replace("''", '"'), norm.NFD(), norm.Lowercase(),
        norm.StripAccents(), norm.Replace(Regex(" {2,}"), " "), norm.Replace(Regex(r"[^\x00-\x7F]+"), ""),
    ])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A <sep>", pair="<cls> $A <sep> $B <sep>",
        special_tokens=[("<cls>", vocab["<cls>"]), ("<sep>", vocab["<sep>"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in special_order])
    return tok


_ROLE_TOKENS = {"bos_token": "<s>", "cls_token": "<cls>", "eos_token": "</s>", "mask_token": "<mask>",
                "pad_token": "<pad>", "sep_token": "<sep>", "unk_token": "<unk>"}


def _special_tokens_map() -> dict:
    """special_tokens_map.json as transformers writes it for the Hub tokenizer."""
    return {"additional_special_tokens": list(SPECIAL_TOKENS), **_ROLE_TOKENS}


def _tokenizer_config(special_order: Sequence[str], max_seq: int) -> dict:
    """tokenizer_config.json: the specials' ids in added_tokens_decoder, model_max_length = max_seq."""
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    return {
        "added_tokens_decoder": {str(i): {"content": s, **flags} for i, s in enumerate(special_order)},
        "additional_special_tokens": list(SPECIAL_TOKENS),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_seq,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **_ROLE_TOKENS,
    }


# ----------------------------------------------------------------------------------------------
# The writer.
# ----------------------------------------------------------------------------------------------

def _check_args(*, layers, hidden, heads, depth, vocab, max_seq, task, num_labels, pooler, head_dim) -> None:
    """Refuse shapes the Hub model could not have, before writing anything."""
    checks = [
        (task in TASK_ARCHITECTURE, f"task must be one of {sorted(TASK_ARCHITECTURE)}, got {task!r}"),
        (pooler in POOLERS, f"pooler must be one of {POOLERS}, got {pooler!r}"),
        (min(layers, heads, vocab, max_seq, num_labels, head_dim) >= 1, "sizes must be positive"),
        (depth >= 0, f"depth must be >= 0, got {depth}"),
        (hidden >= 2 and hidden % 2 == 0, f"hidden must be even (sinusoidal positions), got {hidden}"),
        (hidden % heads == 0, f"hidden ({hidden}) must be divisible by heads ({heads})"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _dump_json(path: Path, obj: object, pretty: bool = True) -> None:
    """HF's formats: pretty files are indented, key-sorted and end in a newline; the training
    config (model_config.json) is one line in insertion order."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n" if pretty else json.dumps(obj)
    path.write_text(text, encoding="utf-8")


def write_random_checkpoint(dst, *, layers: int = 16, hidden: int = 768, heads: int = 12, depth: int = 11,
                            vocab: int = 32768, max_seq: int = 128, seed: int = 0, task: str = "mlm",
                            num_labels: int = 2, pooler: str = "avg", include_ff_layer: bool = True,
                            head_dim: int = 1024, special_order: Sequence[str] | None = None) -> Path:
    """Write a random checkpoint folder at `dst` in the Hub layout and return its path.

    Files: config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, model_config.json. Defaults are the published model's sizes.
    `special_order` fixes which special token gets ids 0-6 (default: shuffled by `seed`).
    The classifier's head has `num_labels` rows and config.json's arch.num_labels says the same.
    """
    _check_args(layers=layers, hidden=hidden, heads=heads, depth=depth, vocab=vocab, max_seq=max_seq,
                task=task, num_labels=num_labels, pooler=pooler, head_dim=head_dim)
    order = _resolve_special_order(special_order, seed)
    token_ids = build_vocab(vocab, order)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)

    dims = dict(layers=layers, hidden=hidden, heads=heads, depth=depth, max_seq=max_seq)
    is_cls = task == "classification"
    arch = _arch(**dims, vocab=vocab, num_labels=num_labels if is_cls else None, pooler=pooler,
                 include_ff_layer=include_ff_layer, head_dim=head_dim)
    # model_config.json is the pretraining config: vocab_size and num_labels unset, default head.
    pretrain_arch = _arch(**dims, vocab=None, num_labels=None, pooler="avg", include_ff_layer=True,
                          head_dim=1024)
    _dump_json(dst / "config.json", _config_json(task, arch))
    _dump_json(dst / "model_config.json", pretrain_arch, pretty=False)
    _dump_json(dst / "tokenizer_config.json", _tokenizer_config(order, max_seq))
    _dump_json(dst / "special_tokens_map.json", _special_tokens_map())
    build_tokenizer(token_ids, order).save(str(dst / "tokenizer.json"), pretty=True)

    specs = tensor_specs(layers=layers, hidden=hidden, heads=heads, depth=depth, vocab=vocab, task=task,
                         num_labels=num_labels, include_ff_layer=include_ff_layer, head_dim=head_dim)
    write_safetensors(dst / "model.safetensors", specs, seed)
    return dst


# ----------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------

DIM_OPTIONS = {"layers": 16, "hidden": 768, "heads": 12, "depth": 11, "vocab": 32768}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m weights_convert.random_checkpoint",
                                description="Write a random UltraFastBERT checkpoint in the Hub layout.")
    p.add_argument("dst", type=Path, help="output folder")
    p.add_argument("--full", action="store_true",
                   help="the published model's sizes (16 layers, 768, 12 heads, depth 11, vocab 32768)")
    for name, full in DIM_OPTIONS.items():
        p.add_argument(f"--{name}", type=int, default=None, help=f"default {full}")
    p.add_argument("--max-seq", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=sorted(TASK_ARCHITECTURE), default="mlm")
    p.add_argument("--num-labels", type=int, default=2)
    p.add_argument("--pooler", choices=POOLERS, default="avg")
    p.add_argument("--head-dim", type=int, default=1024)
    p.add_argument("--no-ff-layer", action="store_true", help="classifier without the pooler dense")
    p.add_argument("--special-order", default=None,
                   help="comma-separated specials for ids 0-6 (default: shuffled by seed)")
    return p


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main(argv: Iterable[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(None if argv is None else list(argv))
    dims = {name: getattr(args, name) for name in DIM_OPTIONS}
    if args.full and any(v is not None for v in dims.values()):
        p.error("--full cannot be combined with --layers/--hidden/--heads/--depth/--vocab")
    dims = {name: full if dims[name] is None else dims[name] for name, full in DIM_OPTIONS.items()}
    order = args.special_order.split(",") if args.special_order else None
    start = time.perf_counter()
    try:
        out = write_random_checkpoint(args.dst, **dims, max_seq=args.max_seq, seed=args.seed,
                                      task=args.task, num_labels=args.num_labels, pooler=args.pooler,
                                      include_ff_layer=not args.no_ff_layer, head_dim=args.head_dim,
                                      special_order=order)
    except ValueError as exc:
        p.error(str(exc))
    size = _dir_size(out)
    print(f"{out}  {size / 1e6:.1f} MB  ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
