"""The DiT's attention as TensorRT plugin nodes (`export_graph(..., attention="plugin")`).

The DiT is traced with attention="triton": its attention calls are the custom ops
torch.ops.flf2v.wan_self_attention / wan_cross_attention, whose fake implementations give the exporter
the output metadata, so no kernel runs while tracing. `translation_table()` maps each op onto one node
of the plugins in kernels/trt_plugin.py: op_type = plugin name, domain "flf2v", attributes num_heads,
plugin_namespace = "flf2v" and aot = 1. An AOT plugin launches one kernel, so the self-attention node
also takes the fp32 RMS statistics rstd = 1 / sqrt(mean(x.float()^2) + eps) [B, L] of the raw q and k,
computed here with standard ops, and its norm weights in the activation dtype (the kernel rounds the
normed x to x's dtype before the weight, as WanRMSNorm does, and multiplies in that dtype).

The plugin ops get ONNX schemas (registered on import) so that the exporter's tracer can emit them, and
onnx.checker and shape inference know their I/O types: a graph whose plugin node has a wrong dtype, input
count or missing attribute fails `onnx.checker.check_model(..., full_check=True)`.

`attention="sage"` traces the DiT built with attention="sage" (torch.ops.flf2v.wan_sage_self_attention): its
self-attention becomes standard ops that norm and rotate q and k, smooth k by its mean over the tokens and
quantize both per block of rows to int8 with fp32 scales (kernels/sage_attention.py's quantization, written
again in ONNX), and one wan_sage_attention plugin node, the 8-bit attention kernel; the cross-attention is the
plugin of attention="plugin".
"""
from __future__ import annotations

import onnx.defs
import onnx_ir as ir
import onnxscript
from onnxscript import opset23 as op
from torch import nn

DOMAIN = "flf2v"
SELF_ATTENTION, CROSS_ATTENTION, SAGE_ATTENTION = "wan_self_attention", "wan_cross_attention", "wan_sage_attention"
PLUGINS = (SELF_ATTENTION, CROSS_ATTENTION)
SAGE_PLUGINS = (SAGE_ATTENTION, CROSS_ATTENTION)
# export options: TensorRT's own Attention node, the fused plugins, or the 8-bit self-attention plugin
ATTENTION = ("onnx", "plugin", "sage")
NODES = {"onnx": (), "plugin": PLUGINS, "sage": SAGE_PLUGINS}  # the plugin nodes each option puts in a DiT graph
DIT_ATTENTION = {"plugin": "triton", "sage": "sage"}  # the WanDiT attention a plugin export traces
ACTIVATION_TYPES = ("tensor(float16)", "tensor(bfloat16)", "tensor(float)")
# Input order and dtypes of the plugins ("T": the activation dtype), as trt_plugin.py registers them.
SELF_INPUTS = (("q", "T"), ("k", "T"), ("v", "T"), ("norm_q_weight", "T"), ("norm_k_weight", "T"),
               ("cos", "tensor(float)"), ("sin", "tensor(float)"), ("rstd_q", "tensor(float)"),
               ("rstd_k", "tensor(float)"))
CROSS_INPUTS = tuple((n, "T") for n in ("q", "k_txt", "v_txt", "k_img", "v_img"))
SAGE_INPUTS = (("q_codes", "tensor(int8)"), ("q_scales", "tensor(float)"), ("k_codes", "tensor(int8)"),
               ("k_scales", "tensor(float)"), ("v", "T"))


def _register_schema(name: str, inputs) -> None:
    if onnx.defs.has(name, 1, DOMAIN):
        return
    S = onnx.defs.OpSchema
    attrs = [S.Attribute("num_heads", S.AttrType.INT), S.Attribute("plugin_namespace", S.AttrType.STRING),
             S.Attribute("aot", S.AttrType.INT)]
    schema = S(name, DOMAIN, 1, f"flf2v TensorRT plugin {name} (kernels/trt_plugin.py)",
               inputs=[S.FormalParameter(n, t) for n, t in inputs], outputs=[S.FormalParameter("out", "T")],
               type_constraints=[("T", list(ACTIVATION_TYPES), "the activation dtype")], attributes=attrs)
    like = [n for n, t in inputs].index("q" if name != SAGE_ATTENTION else "v")  # the output's dtype
    schema.set_type_and_shape_inference_function(lambda ctx: ctx.set_output_type(0, ctx.get_input_type(like)))
    onnx.defs.register_schema(schema)


_register_schema(SELF_ATTENTION, SELF_INPUTS)
_register_schema(CROSS_ATTENTION, CROSS_INPUTS)
_register_schema(SAGE_ATTENTION, SAGE_INPUTS)
_plugins = onnxscript.values.Opset(DOMAIN, 1)


def _plugin_attrs(num_heads: int) -> dict:
    return {"num_heads": int(num_heads), "plugin_namespace": DOMAIN, "aot": 1}


def _rstd(x, eps: float):
    """1 / sqrt(mean(x^2) + eps) over the last axis, [B, L], in fp32 whatever x's dtype."""
    xf = op.Cast(x, to=ir.DataType.FLOAT)
    ms = op.ReduceMean(op.Mul(xf, xf), op.Constant(value_ints=[-1]), keepdims=0)
    return op.Reciprocal(op.Sqrt(op.Add(ms, op.Constant(value_float=float(eps)))))


def _static(value, axis: int) -> int:
    d = value.shape[axis] if value.shape is not None else None
    if not isinstance(d, int):
        raise ValueError(f"{value.name}: axis {axis} must be static for the plugin, got shape {value.shape}")
    return d


def self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, eps: float, num_heads: int = 0):
    """flf2v::wan_self_attention(q, k, v, norm weights, cos, sin, eps, num_heads) -> one plugin node.

    Annotated parameters are attributes to the exporter (an `int | None` would become a tensor input);
    num_heads 0 stands for the op's None: head_dim = 2 * cos.shape[1]."""
    if not num_heads:
        num_heads = _static(q, -1) // (2 * _static(cos, -1))

    def weight(w):
        return w if w.dtype == q.dtype else op.Cast(w, to=q.dtype)

    return _plugins.wan_self_attention(q, k, v, weight(norm_q_weight), weight(norm_k_weight), cos, sin,
                                       _rstd(q, eps), _rstd(k, eps), **_plugin_attrs(num_heads))


def cross_attention(q, k_txt, v_txt, k_img, v_img, num_heads: int):
    """flf2v::wan_cross_attention(q, k_txt, v_txt, k_img, v_img, num_heads) -> one plugin node."""
    return _plugins.wan_cross_attention(q, k_txt, v_txt, k_img, v_img, **_plugin_attrs(num_heads))


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export: the flf2v custom ops -> plugin nodes."""
    import torch

    import flf2v.kernels.ops  # noqa: F401  (registers torch.ops.flf2v.*)
    return {torch.ops.flf2v.wan_self_attention.default: self_attention,
            torch.ops.flf2v.wan_cross_attention.default: cross_attention}


def check_triton_attention(mod: nn.Module, attention: str = "plugin") -> None:
    """The DiTs in `mod` must call the flf2v custom ops (`WanDiT(..., attention="triton")`, or "sage" for
    attention="sage"), which `translation_table` turns into plugin nodes."""
    from flf2v.models.dit import WanDiT
    dits, want = [m for m in mod.modules() if isinstance(m, WanDiT)], DIT_ATTENTION[attention]
    if not dits:
        raise ValueError(f"attention={attention!r} applies to the DiT; {type(mod).__name__} holds none")
    other = {m.attention for m in dits} - {want}
    if other:
        raise ValueError(f"attention={attention!r} exports a DiT built with attention={want!r}, not {other}")
