"""An FP8 DiT's linears as ONNX Q/DQ (the convention of NVIDIA's Model Optimizer: QuantizeLinear /
DequantizeLinear with float8e4m3fn, opset >= 19), which TensorRT 11's strongly typed builder fuses into FP8
GEMMs and ONNX Runtime's CPU provider executes, so the quantized graph's numerics are tested on a CPU.

`flf2v::fp8_linear(x, weight, weight_scale, bias)` (models/quant.py) becomes, with x as [N, K] tokens:

    s_x = max(ReduceMax(|x|, axis 1) / 448, 1e-12)                  dynamic, one fp32 scale per token
    x'  = DequantizeLinear(QuantizeLinear(x, s_x, axis=0), s_x, axis=0)
    W'  = DequantizeLinear(weight [float8 initializer], weight_scale, axis=0)   per output channel
    y   = MatMul(x', W'^T) + bias                                   fp32, then x's dtype

the same scales and rounding (round to nearest even, saturating) as models.quant.fp8_linear, which runs
torch._scaled_mm. Written by hand rather than with Model Optimizer: its FP8 recipes calibrate one static
activation scale per tensor, while the scales here are dynamic per token and must match torch's exactly.
"""
from __future__ import annotations

import onnx_ir as ir
from onnxscript import opset23 as op

from flf2v.models.quant import FP8_MAX, TINY


def fp8_linear(x, weight, weight_scale, bias):
    """flf2v::fp8_linear -> Q/DQ + MatMul (see the module docstring)."""
    k = op.Shape(x, start=-1)
    x2 = op.Reshape(op.Cast(x, to=ir.DataType.FLOAT), op.Concat(op.Constant(value_ints=[-1]), k, axis=0))
    amax = op.ReduceMax(op.Abs(x2), op.Constant(value_ints=[1]), keepdims=0)
    s_x = op.Max(op.Div(amax, op.Constant(value_float=FP8_MAX)), op.Constant(value_float=TINY))
    x_q = op.QuantizeLinear(x2, s_x, axis=0, output_dtype=ir.DataType.FLOAT8E4M3FN, saturate=1)
    x_dq = op.DequantizeLinear(x_q, s_x, axis=0)
    w_dq = op.DequantizeLinear(weight, weight_scale, axis=0)
    y = op.Add(op.MatMul(x_dq, op.Transpose(w_dq, perm=[1, 0])), op.Cast(bias, to=ir.DataType.FLOAT))
    out_shape = op.Concat(op.Slice(op.Shape(x), op.Constant(value_ints=[0]), op.Constant(value_ints=[-1])),
                          op.Shape(weight, start=0, end=1), axis=0)
    return op.CastLike(op.Reshape(y, out_shape), x)


def translation_table() -> dict:
    """custom_translation_table entries for torch.onnx.export: flf2v::fp8_linear -> Q/DQ."""
    import torch  # torch.ops.flf2v.fp8_linear is registered by models/quant.py, imported above
    return {torch.ops.flf2v.fp8_linear.default: fp8_linear}
