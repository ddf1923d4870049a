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
"""
from __future__ import annotations

import onnx.defs
import onnx_ir as ir
import onnxscript
from onnxscript import opset23 as op
from torch import nn

DOMAIN = "flf2v"
SELF_ATTENTION, CROSS_ATTENTION = "wan_self_attention", "wan_cross_attention"
PLUGINS = (SELF_ATTENTION, CROSS_ATTENTION)
ATTENTION = ("onnx", "plugin")  # export options: TensorRT's own Attention node, or the plugins
ACTIVATION_TYPES = ("tensor(float16)", "tensor(bfloat16)", "tensor(float)")
# Input order and dtypes of the plugins ("T": the activation dtype), as trt_plugin.py registers them.
SELF_INPUTS = (("q", "T"), ("k", "T"), ("v", "T"), ("norm_q_weight", "T"), ("norm_k_weight", "T"),
               ("cos", "tensor(float)"), ("sin", "tensor(float)"), ("rstd_q", "tensor(float)"),
               ("rstd_k", "tensor(float)"))
CROSS_INPUTS = tuple((n, "T") for n in ("q", "k_txt", "v_txt", "k_img", "v_img"))


def _register_schema(name: str, inputs) -> None:
    if onnx.defs.has(name, 1, DOMAIN):
        return
    S = onnx.defs.OpSchema
    attrs = [S.Attribute("num_heads", S.AttrType.INT), S.Attribute("plugin_namespace", S.AttrType.STRING),
             S.Attribute("aot", S.AttrType.INT)]
    schema = S(name, DOMAIN, 1, f"flf2v TensorRT plugin {name} (kernels/trt_plugin.py)",
               inputs=[S.FormalParameter(n, t) for n, t in inputs], outputs=[S.FormalParameter("out", "T")],
               type_constraints=[("T", list(ACTIVATION_TYPES), "the activation dtype")], attributes=attrs)
    schema.set_type_and_shape_inference_function(lambda ctx: ctx.set_output_type(0, ctx.get_input_type(0)))
    onnx.defs.register_schema(schema)


_register_schema(SELF_ATTENTION, SELF_INPUTS)
_register_schema(CROSS_ATTENTION, CROSS_INPUTS)
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


def check_triton_attention(mod: nn.Module) -> None:
    """The DiTs in `mod` must call the flf2v custom ops (`WanDiT(..., attention="triton")`), which
    `translation_table` turns into plugin nodes."""
    from flf2v.models.dit import WanDiT
    dits = [m for m in mod.modules() if isinstance(m, WanDiT)]
    if not dits:
        raise ValueError(f"attention='plugin' applies to the DiT; {type(mod).__name__} holds none")
    other = {m.attention for m in dits} - {"triton"}
    if other:
        raise ValueError(f"attention='plugin' exports a DiT built with attention='triton', not {other}")
