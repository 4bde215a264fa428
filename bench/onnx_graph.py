"""The UltraFastBERT encoder with a dense feedforward, as an ONNX graph built with `onnx.helper`.

Why build it by hand: exporting needs torch and the reference code; here the graph is written op by
op from MODEL.md's forward pass, with the engine's own (converted) weights, so ONNX Runtime runs
exactly the computation of ufcpu's dense rows and nothing else:
embedding Gather + scaled sinusoidal positions, LayerNorm; per layer a pre-LN block with a fused QKV
MatMul, per-head attention with the additive -10000 key mask and Softmax, the output projection,
a dense GELU (erf) feedforward; the final LayerNorm. Output: hidden states [B, S, H].

Also here: the graph quantized by ONNX Runtime, and compiled by OpenVINO, as a user of either would.
Only this file and bench/encoder.py import onnx; it is an optional extra (as are onnxruntime and openvino).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dense import DenseFF
from ufcpu import kernels
from ufcpu.model import sinusoidal_positions

f32 = np.float32
OPSET = 17            # LayerNormalization is a standard op from 17 on
GRAPH_VERSION = 2     # bump when the graph changes: cached .onnx files are keyed by it


class Graph:
    """Collects nodes and initializers; every op output gets a fresh name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value) -> str:
        # np.array, not np.ascontiguousarray: the latter turns 0-d scalars into shape [1]
        self.inits.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._count += 1
        out = f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out


def _layer_norm(g: Graph, x: str, w: str, b: str, eps: float) -> str:
    return g.op("LayerNormalization", x, w, b, axis=-1, epsilon=eps)


def _attention(g: Graph, h: str, bias: str, i: int, layer, heads: int, hidden: int) -> str:
    """[B, S, H] -> [B, S, H]. Engine layout: qkv rows are Q | K | V blocks, each head-major."""
    d = hidden // heads
    qkv = g.op("MatMul", h, g.const(f"l{i}.qkv_t", layer.qkv.T))                      # [B, S, 3H]
    qkv = g.op("Reshape", qkv, g.const(f"l{i}.qkv_shape", np.array([0, 0, 3, heads, d], np.int64)))
    qkv = g.op("Transpose", qkv, perm=[2, 0, 3, 1, 4])                                 # [3, B, A, S, d]
    q, k, v = (g.op("Gather", qkv, g.const(f"l{i}.pick{j}", np.array(j, np.int64)), axis=0) for j in range(3))
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))                # [B, A, S, S]
    scores = g.op("Add", g.op("Mul", scores, g.const(f"l{i}.scale", np.array(layer.norm_factor, f32))), bias)
    probs = g.op("Softmax", scores, axis=-1)
    ctx = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3])               # [B, S, A, d]
    ctx = g.op("Reshape", ctx, g.const(f"l{i}.ctx_shape", np.array([0, 0, hidden], np.int64)))
    return g.op("MatMul", ctx, g.const(f"l{i}.attn_out_t", layer.attn_out.T))


def _feedforward(g: Graph, h: str, i: int, ff: DenseFF) -> str:
    """[B, S, H] -> [B, S, H]: GELU(h @ w1.T + b1) @ w2.T, GELU written with Erf (exact, as the
    model's); ONNX Runtime fuses the pattern into its Gelu kernel."""
    a = g.op("MatMul", h, g.const(f"l{i}.ff_w1_t", ff.w1.T))
    if ff.b1 is not None:
        a = g.op("Add", a, g.const(f"l{i}.ff_b1", ff.b1))
    erf = g.op("Erf", g.op("Mul", a, "c_sqrt1_2"))
    gelu = g.op("Mul", g.op("Mul", a, "c_half"), g.op("Add", erf, "c_one"))
    return g.op("MatMul", gelu, g.const(f"l{i}.ff_w2_t", ff.w2.T))


def build(weights, cfg, dense: list[DenseFF]) -> onnx.ModelProto:
    """Weights: a loaded ufcpu model's `Weights`; dense: one DenseFF per layer (bench/dense.py)."""
    g = Graph()
    hid = cfg.hidden
    g.const("c_one", np.array(1.0, f32))
    g.const("c_half", np.array(0.5, f32))
    g.const("c_sqrt1_2", np.array(1 / math.sqrt(2.0), f32))
    # embedding: word rows + scale * positions[:S], LayerNorm
    x = g.op("Gather", g.const("word", weights.word), "input_ids")                     # [B, S, H]
    pos = g.const("pos", weights.pos_scale * sinusoidal_positions(cfg.max_seq, hid))   # [max_seq, H]
    seq = g.op("Shape", "input_ids", start=1, end=2)                                   # [1] = S
    zero = g.const("c_zero1", np.array([0], np.int64))
    x = g.op("Add", x, g.op("Slice", pos, zero, seq, zero))
    x = _layer_norm(g, x, g.const("emb_ln_w", weights.emb_ln_w), g.const("emb_ln_b", weights.emb_ln_b), cfg.norm_eps)
    # additive key mask: (1 - mask) * -10000, broadcast over heads and queries
    maskf = g.op("Cast", "attention_mask", to=TensorProto.FLOAT)
    bias = g.op("Mul", g.op("Sub", "c_one", maskf), g.const("c_mask_bias", np.array(kernels.MASK_BIAS, f32)))
    bias = g.op("Unsqueeze", bias, g.const("c_axes_1_2", np.array([1, 2], np.int64)))  # [B, 1, 1, S]
    for i, (layer, ff) in enumerate(zip(weights.layers, dense)):
        h = _layer_norm(g, x, g.const(f"l{i}.ln1_w", layer.ln1_w), g.const(f"l{i}.ln1_b", layer.ln1_b), cfg.norm_eps)
        x = g.op("Add", x, _attention(g, h, bias, i, layer, cfg.heads, hid))
        h = _layer_norm(g, x, g.const(f"l{i}.ln2_w", layer.ln2_w), g.const(f"l{i}.ln2_b", layer.ln2_b), cfg.norm_eps)
        x = g.op("Add", x, _feedforward(g, h, i, ff))
    out = _layer_norm(g, x, g.const("final_ln_w", weights.final_ln_w), g.const("final_ln_b", weights.final_ln_b),
                      cfg.norm_eps)
    g.nodes.append(helper.make_node("Identity", [out], ["hidden_states"]))
    graph = helper.make_graph(
        g.nodes, f"ultrafastbert-dense-{dense[0].width}",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["batch", "seq", hid])],
        initializer=g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             producer_name="ufcpu-bench")


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Weights go to one external data file next to the graph (protobuf stops at 2 GB). Written
    under a temporary name and renamed, so an interrupted build is never mistaken for a cached one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.onnx")
    onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    tmp.replace(path)
    return path


def session(path: Path, threads: int):
    """An ONNX Runtime CPU session with `threads` intra-op threads (inter-op 1, sequential),
    all graph optimisations on: what a user who picks ORT for speed would configure."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def quantized_int8(path: Path, log=print) -> Path:
    """The graph quantized as a user would in two lines: ONNX Runtime's dynamic quantization with
    int8 weights (`quantize_dynamic(..., weight_type=QuantType.QInt8)`, defaults otherwise). Built
    once per ORT version, under a temporary name renamed when complete (the int8 full model fits
    one protobuf, so no external data)."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name(f"{path.stem}-int8-ort{onnxruntime.__version__}.onnx")
    if out.is_file():
        return out
    log(f"quantizing {path.name} -> {out.name} (once)")
    tmp = out.with_name(out.stem + ".partial.onnx")
    quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8)
    tmp.replace(out)
    return out


# OpenVINO's precision: its default (bf16 on CPUs with bf16 units, else f32), or f32 (the float twin)
OPENVINO_PRECISION = {"default": {}, "float32": {"INFERENCE_PRECISION_HINT": "f32"}}


def openvino_compiled(path: Path, threads: int, precision: str = "default"):
    """The float32 graph compiled by OpenVINO for the CPU with `threads` threads and the LATENCY
    hint (one request at a time, as the benchmark runs it)."""
    import openvino

    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", **OPENVINO_PRECISION[precision]}
    return openvino.Core().compile_model(str(path), "CPU", config)
