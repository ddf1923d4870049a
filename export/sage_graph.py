"""flf2v::wan_sage_self_attention in a TensorRT graph: the 8-bit attention's quantization in standard ONNX ops,
then one wan_sage_attention plugin node (kernels/trt_plugin.py) running sage_attention.py's attention kernel.

kernels/sage_attention.py runs the quantization as Triton passes of its own; an AOT plugin launches one kernel,
so here the graph does it, in the same fp32 operations and order, and TensorRT fuses the element-wise chain:
  q', k' = rope(RMSNorm(x) * w), rounded to x's dtype            (the cast points of WanRMSNorm and the spec)
  k' -= mean of k' over the tokens, per head and channel         (smoothing: softmax ignores the shift)
  per block of 128 q rows / 64 k rows and head: x * mult, scale = amax / 127 (1 for an all-zero block),
  codes = round-half-away-from-zero(x / scale) as int8; q's mult = log2(e) / sqrt(D), k's 1
Rows past L are zero padding, which cannot raise a block's amax (the kernel masks them the same way).
"""
from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript import opset23 as op

from .plugins import _plugin_attrs, _plugins, _rstd, _static

FLOAT = ir.DataType.FLOAT


def _ints(*v):
    return op.Constant(value_ints=list(v))


def _norm_rope(x, w, cos, sin, eps: float, heads: int, d: int):
    """rope(RMSNorm(x) * w) [B, L, H, D] in fp32, rounded to x's dtype as the kernel's norm_rope is."""
    n = op.Cast(op.Mul(op.Cast(x, to=FLOAT), op.Unsqueeze(_rstd(x, eps), _ints(-1))), to=x.dtype)
    n = op.Mul(n, w if w.dtype == x.dtype else op.Cast(w, to=x.dtype))
    pairs = op.Reshape(op.Cast(n, to=FLOAT), _ints(0, 0, heads, d // 2, 2))  # channels (2i, 2i + 1) of a head
    even, odd = op.Split(pairs, axis=-1, num_outputs=2)
    even, odd = op.Squeeze(even, _ints(-1)), op.Squeeze(odd, _ints(-1))
    c, s = (op.Unsqueeze(t, _ints(0, 2)) for t in (cos, sin))  # [1, L, 1, D/2]
    re, im = op.Sub(op.Mul(even, c), op.Mul(odd, s)), op.Add(op.Mul(even, s), op.Mul(odd, c))
    y = op.Reshape(op.Concat(op.Unsqueeze(re, _ints(-1)), op.Unsqueeze(im, _ints(-1)), axis=-1),
                   _ints(0, 0, heads, d))
    return op.Cast(op.Cast(y, to=x.dtype), to=FLOAT)


def _quantize(x, block: int, mult: float, heads: int, d: int):
    """x [B, L, H, D] fp32 -> (int8 codes [B, L, H * D], fp32 scales [B, H, cdiv(L, block)])."""
    length = op.Shape(x, start=1, end=2)
    pad = op.Mod(op.Sub(_ints(block), op.Mod(length, _ints(block))), _ints(block))
    xb = op.Pad(op.Mul(x, op.Constant(value_float=float(mult))), op.Concat(_ints(0, 0, 0, 0, 0), pad, _ints(0, 0),
                                                                         axis=0))
    xb = op.Reshape(xb, _ints(0, -1, block, heads, d))  # [B, n, block, H, D]
    amax = op.ReduceMax(op.Abs(xb), _ints(2, 4), keepdims=1)
    scale = op.Where(op.Greater(amax, op.Constant(value_float=0.0)),
                     op.Div(amax, op.Constant(value_float=127.0)), op.Constant(value_float=1.0))
    xs = op.Div(xb, scale)
    codes = op.Mul(op.Sign(xs), op.Floor(op.Add(op.Abs(xs), op.Constant(value_float=0.5))))  # exact integers
    codes = op.Slice(op.Reshape(codes, _ints(0, -1, heads * d)), _ints(0), length, _ints(1))
    scales = op.Transpose(op.Squeeze(scale, _ints(2, 4)), perm=[0, 2, 1])
    return op.Cast(codes, to=ir.DataType.INT8), scales


def sage_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, eps: float, num_heads: int = 0):
    """flf2v::wan_sage_self_attention(q, k, v, norm weights, cos, sin, eps, num_heads) -> the quantization ops
    and one wan_sage_attention plugin node (num_heads 0: the op's None, head_dim = 2 * cos.shape[1])."""
    from flf2v.kernels.common import LOG2E  # the kernels (Triton) load when a sage graph is traced, not before
    from flf2v.kernels.sage_attention import BLOCK_M, BLOCK_N
    d = 2 * _static(cos, -1)
    heads = num_heads or _static(q, -1) // d
    qn = _norm_rope(q, norm_q_weight, cos, sin, eps, heads, d)
    kn = _norm_rope(k, norm_k_weight, cos, sin, eps, heads, d)
    kn = op.Sub(kn, op.ReduceMean(kn, _ints(1), keepdims=1))
    q_codes, q_scales = _quantize(qn, BLOCK_M, LOG2E / math.sqrt(d), heads, d)
    k_codes, k_scales = _quantize(kn, BLOCK_N, 1.0, heads, d)
    return _plugins.wan_sage_attention(q_codes, q_scales, k_codes, k_scales, v, **_plugin_attrs(heads))


def translation_table() -> dict:
    """plugins.translation_table with flf2v::wan_sage_self_attention -> this module's ops and sage plugin node."""
    import torch

    from .plugins import translation_table as plugin_table
    return plugin_table() | {torch.ops.flf2v.wan_sage_self_attention.default: sage_self_attention}
