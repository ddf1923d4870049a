"""Graph passes (onnx-graphsurgeon cleanup + constant folding) and the checks every exported graph passes.

Everything here works on the graph structure: weights stored as external data (the 33 GB DiT) are never
read. Small external tensors are inlined first so that folding can see them; nodes that read a large
external tensor, or any bf16 constant (graphsurgeon would hand it to NumPy as fp32 and change the
graph's types), are left for TensorRT to fold at build time.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from .contracts import Graph

gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # bf16 "no NumPy type" notes: handled below

# ONNX operators the TensorRT 10.15 ONNX parser supports (onnx-tensorrt docs/operators.md, "Y" rows; opsets
# 9..24). TensorRT 11 keeps them. Attention needs 10.14+ (one output only), RMSNormalization and
# RotaryEmbedding 10.15+.
TRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax
Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish
Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan
Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK Transpose
Trilu Unsqueeze Upsample Where Xor
""".split())
DEFAULT_DOMAINS = ("", "ai.onnx")
INLINE_BYTES = 16 << 20  # external tensors up to this size are inlined so folding can read them
FOLD_BYTES = 256 << 20  # folded constants up to this size replace their subgraph
ONNX_DTYPE = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.BFLOAT16: "bfloat16",
              onnx.TensorProto.INT64: "int64"}


def load_structure(path: str | os.PathLike) -> onnx.ModelProto:
    """The graph without its external weights (those stay references into the .data file)."""
    return onnx.load(str(path), load_external_data=False)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _inline_small(model: onnx.ModelProto, base: Path) -> None:
    for t in model.graph.initializer:
        if uses_external_data(t) and _tensor_bytes(t) <= INLINE_BYTES:
            load_external_data_for_tensor(t, str(base))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]


def _keep_for_trt(node: gs.Node) -> bool:
    for t in node.inputs:
        if isinstance(t, gs.Constant):
            proto = t._values.tensor if isinstance(t._values, gs.ir.tensor.LazyValues) else None
            if proto is not None and (proto.data_type == onnx.TensorProto.BFLOAT16 or uses_external_data(proto)):
                return True
    return False


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _explicit_fp32_norms(model: onnx.ModelProto) -> None:
    """The exporter fuses `x.float()` into the norm (bf16 X, fp32 scale and output, stash_type fp32);
    put the Cast back in front so that the fp32 island is explicit to a strongly typed TensorRT build."""
    types = _value_types(model)
    nodes = []
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "RMSNormalization") and len(node.input) > 1:
            x, scale = types.get(node.input[0]), types.get(node.input[1])
            if scale == onnx.TensorProto.FLOAT and x not in (None, scale):
                name = f"{node.input[0]}_to_float"
                nodes.append(onnx.helper.make_node("Cast", [node.input[0]], [name], to=scale, name=name))
                node.input[0] = name
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def clean(path: str | os.PathLike, keep_named: str | None = None) -> None:
    """Explicit fp32 norms, cleanup, toposort, constant folding; in place, external data left as is.
    `keep_named`: an initializer name prefix whose consumers are not folded, so those weights keep their
    checkpoint names in the file (the DiT's "net.": an ONNX Runtime LoRA swap overrides them by name;
    ONNX Runtime and TensorRT fold the transposes themselves when they load the graph)."""
    path = Path(path)
    model = load_structure(path)
    _inline_small(model, path.parent)
    model = onnx.shape_inference.infer_shapes(model)
    _explicit_fp32_norms(model)
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    def exclude(node: gs.Node) -> bool:
        return _keep_for_trt(node) or bool(keep_named) and any(
            isinstance(t, gs.Constant) and t.name.startswith(keep_named) for t in node.inputs)
    graph.fold_constants(partitioning="basic", size_threshold=FOLD_BYTES, should_exclude_node=exclude)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version, out.producer_name = model.ir_version, model.producer_name
    out.producer_version = model.producer_version
    tmp = path.with_name(path.name + ".clean")
    onnx.save(out, str(tmp))
    os.replace(tmp, path)


# ---- checks ---------------------------------------------------------------------------------------

def check_trt_ops(model: onnx.ModelProto, plugins: tuple[str, ...] = ()) -> list[str]:
    """Op types of `model` (subgraphs included) the TensorRT ONNX parser does not take; `plugins` names
    custom ops (TensorRT plugins) that are allowed in any domain."""
    bad = set()
    for node in _nodes(model.graph):
        if node.op_type in plugins:
            continue
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in TRT_OPS:
            bad.add(node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}")
    return sorted(bad)


def _nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(g)


def float64_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of float64 initializers, values, Cast targets and Constants: none may exist."""
    f64 = onnx.TensorProto.DOUBLE
    g = model.graph
    bad = [t.name for t in g.initializer if t.data_type == f64]
    bad += [v.name for v in (*g.input, *g.output, *g.value_info) if v.type.tensor_type.elem_type == f64]
    for node in _nodes(g):
        for a in node.attribute:
            if (a.name == "to" and a.i == f64) or (a.HasField("t") and a.t.data_type == f64):
                bad.append(f"{node.op_type} {node.name}")
    return bad


def io_specs(model: onnx.ModelProto) -> tuple[list[tuple], list[tuple]]:
    """[(name, shape, dtype)] of the graph inputs and outputs; a dynamic dim is its name ("2*hp")."""
    def spec(v):
        t = v.type.tensor_type
        shape = tuple(d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim)
        return v.name, shape, ONNX_DTYPE.get(t.elem_type, str(t.elem_type))
    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def unfused_norm_inputs(model: onnx.ModelProto) -> list[str]:
    """LayerNormalization / RMSNormalization nodes whose input is not fp32: the fp32 islands must hold."""
    model = onnx.shape_inference.infer_shapes(model)
    types = _value_types(model)
    return [n.name for n in _nodes(model.graph) if n.op_type in ("LayerNormalization", "RMSNormalization")
            and types.get(n.input[0]) != onnx.TensorProto.FLOAT]


def attention_problems(model: onnx.ModelProto) -> list[str]:
    """Attention nodes outside what TensorRT parses: Q, K, V (and mask) 4D, no KV-cache inputs, one output."""
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*g.input, *g.output, *g.value_info)}
    ranks.update({t.name: len(t.dims) for t in g.initializer})
    bad = []
    for n in _nodes(g):
        if n.op_type != "Attention":
            continue
        used = [i for i in n.input if i]
        if (any(ranks.get(i) != 4 for i in used[:4]) or any(n.input[4:]) or sum(1 for o in n.output if o) != 1):
            bad.append(n.name)
    return bad


def check_graph(path: str | os.PathLike, graph: Graph, plugins: tuple[str, ...] = ()) -> list[str]:
    """Every problem of the exported file against the contract and TensorRT; [] when it is fine."""
    model = load_structure(path)
    problems = []
    bad = check_trt_ops(model, plugins)
    if bad:
        problems.append(f"ops the TensorRT ONNX parser does not support: {', '.join(bad)}")
    f64 = float64_tensors(model)
    if f64:
        problems.append(f"float64 tensors: {', '.join(f64[:5])}")
    ins, outs = io_specs(model)
    want_in = [(s.name, s.shape, s.dtype) for s in graph.inputs]
    want_out = [(s.name, s.shape, s.dtype) for s in graph.outputs]
    if ins != want_in:
        problems.append(f"inputs {_diff(ins, want_in)}")
    if outs != want_out:
        problems.append(f"outputs {_diff(outs, want_out)}")
    att = attention_problems(model)
    if att:
        problems.append(f"Attention nodes TensorRT cannot parse (need 4D Q/K/V/mask, one output): {', '.join(att[:5])}")
    norms = unfused_norm_inputs(model)
    if norms:
        problems.append(f"normalizations outside fp32: {', '.join(norms[:5])}")
    return problems


def _diff(got: list, want: list) -> str:
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"#{i} is {a}, the contract says {b}"
    return f"count {len(got)}, the contract says {len(want)}"
