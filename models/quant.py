"""FP8 (e4m3) linear layers for the DiT's blocks: `--quant fp8`.

Weights: one fp32 scale per output channel, weight_scale = amax(|W[row]|) / 448, stored as float8_e4m3fn
[out, in]. Activations: one dynamic fp32 scale per token, amax(|x[token]|) / 448, computed at every call.
y = (x_q @ W_q^T) * s_x * s_w + b, accumulated in fp32. These are the scale shapes all three backends take
natively: torch._scaled_mm's row-wise scales, ONNX QuantizeLinear/DequantizeLinear per axis (what TensorRT's
strongly typed builder fuses into FP8 GEMMs), so they quantize identically.

Only the blocks' linears are quantized (self/cross q, k, v, o, k_img, v_img, the FFN): 27.7% of a 720p
DiT forward. The patch and time embeddings, modulation, norms, head and the text/image MLPs stay in the run
dtype, as LightX2V's and TensorRT-LLM's FP8 Wan recipes keep them: they are under 1% of the FLOPs and feed
every block (modulation, time) or the output (head), where an error is not averaged away.

FP8 checkpoint files load as they are: a float8 weight is the layer's FP8 weight with scale 1 (ComfyUI's
`*_fp8_e4m3fn` DiT files are plain casts), never upcast and quantized again.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(float8_e4m3fn).max
TINY = 1e-12  # an all-zero token or row gets this scale instead of 0 (x / 0 would be NaN)
QUANTS = ("none", "fp8")
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")


def check_quant(quant: str) -> str:
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    return quant


def stored_dtype(key: str, declared: torch.dtype, run: torch.dtype) -> torch.dtype:
    """The dtype a state-dict tensor takes in a network run in `run`: FP8 weights and their fp32 scales
    keep the dtype the network declares (`declared`); other floating tensors take `run`."""
    if declared == FP8 or key.endswith(".weight_scale") or not declared.is_floating_point:
        return declared
    return run


def quantize_weight(w: torch.Tensor, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (W_q float8 [out, in], scale fp32): per output channel ([out]) or, with `block`, one
    scale per block x block tile ([ceil(out/block), ceil(in/block)], TensorRT-LLM's blockwise recipe)."""
    wf = w.float()
    if block is None:
        scale = (wf.abs().amax(dim=1) / FP8_MAX).clamp(min=TINY)
        return (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    out, cin = wf.shape
    tiles = F.pad(wf, (0, -cin % block, 0, -out % block)).unflatten(0, (-1, block)).unflatten(2, (-1, block))
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=TINY)
    full = scale.repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :cin]
    return (wf / full).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_weight(w_q: torch.Tensor, scale: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """fp32 W from either scale layout of `quantize_weight` (`block`: the one it was quantized with)."""
    if block is None:
        return w_q.float() * scale[:, None]
    full = scale.repeat_interleave(block, 0)[:w_q.shape[0]].repeat_interleave(block, 1)[:, :w_q.shape[1]]
    return w_q.float() * full


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] -> (x_q float8 [N, K], scale fp32 [N, 1]): one dynamic scale per token."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=TINY)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [..., in] (any float dtype), weight float8 [out, in], weight_scale fp32 [out], bias [out]
    -> [..., out] in x's dtype. The GEMM is torch._scaled_mm (fp32 accumulation) on the CPU and the GPU."""
    x_q, x_scale = quantize_tokens(x.reshape(-1, x.shape[-1]))
    # CUDA's row-wise _scaled_mm writes bf16 only; the CPU's writes fp32, which keeps the fp32 tests exact
    out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    y = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=weight_scale[None].float(), out_dtype=out_dtype)
    return (y.float() + bias.float()).to(x.dtype).view(*x.shape[:-1], -1)


@torch.library.custom_op("flf2v::fp8_linear", mutates_args=())
def fp8_linear_op(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor) -> torch.Tensor:
    """`fp8_linear` as one op node: what the ONNX export translates into Q/DQ (export/qdq.py)."""
    return fp8_linear(x, weight, weight_scale, bias)


@fp8_linear_op.register_fake
def _(x, weight, weight_scale, bias):
    if weight.dtype != FP8 or weight.shape[1] != x.shape[-1] or weight_scale.shape != weight.shape[:1]:
        raise ValueError(f"fp8_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)} {weight.dtype}, "
                         f"weight_scale {tuple(weight_scale.shape)}")
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class FP8Linear(nn.Module):
    """nn.Linear with an FP8 weight and per-output-channel scales (buffers, state-dict keys weight,
    weight_scale, bias). Under ONNX export it is one `flf2v::fp8_linear` node, translated into Q/DQ."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype))

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> "FP8Linear":
        q = cls(layer.in_features, layer.out_features, layer.bias.dtype).to(layer.weight.device)
        if layer.weight.is_meta:
            return q.to("meta")
        q.weight, q.weight_scale = quantize_weight(layer.weight.detach())
        q.bias = layer.bias.detach().clone()
        return q

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            return fp8_linear_op(x, self.weight, self.weight_scale, self.bias)
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-channel"


def block_linear_names(dit: nn.Module) -> list[str]:
    """Full module names of the linears `quantize_dit` replaces, blocks in order."""
    return [f"blocks.{i}.{n}" for i in range(len(dit.blocks)) for n in BLOCK_LINEARS]


def quantize_dit(dit: nn.Module) -> nn.Module:
    """Replace the blocks' linears of a WanDiT (real or meta) by FP8Linear in place, one layer at a time
    (each bf16 weight is freed as its FP8 copy is made)."""
    for name in block_linear_names(dit):
        parent, _, leaf = name.rpartition(".")
        owner = dit.get_submodule(parent)
        setattr(owner, leaf, FP8Linear.from_linear(getattr(owner, leaf)))
    dit.quant = "fp8"
    return dit


def fp8_source(source: dict[str, Callable[[], torch.Tensor]], layers: list[str]) -> dict[str, Callable]:
    """A DiT tensor source (key -> getter) as an FP8 DiT's state dict: every `layers` weight becomes its
    per-channel FP8 weight and `weight_scale`, quantized when read (float8 weights pass as they are, scale
    1: no bf16 round trip). Each weight is read once: the scale's getter reuses the weight's result."""
    out = dict(source)
    for name in layers:
        read = source[f"{name}.weight"]
        memo: dict = {}

        def quantized(read=read, memo=memo):
            if not memo:
                w = read()
                memo["q"] = (w, torch.ones(w.shape[0])) if w.dtype == FP8 else quantize_weight(w)
            return memo["q"]

        def weight(quantized=quantized):
            return quantized()[0]

        def scale(quantized=quantized, memo=memo):
            s = quantized()[1]
            memo.clear()  # the weight was taken first (state-dict order): drop the pair
            return s
        out[f"{name}.weight"], out[f"{name}.weight_scale"] = weight, scale
    return out


def layer_errors(ref: nn.Module, quant: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative error ||y_q - y|| / ||y|| of each quantized layer on the same input (`inputs`: layer name ->
    the input it saw in the reference run, e.g. from `capture_inputs`)."""
    def run(layer, x):  # an nn.Linear takes its weights' dtype; FP8Linear any
        return layer(x.to(layer.weight.dtype) if isinstance(layer, nn.Linear) else x).float()

    out = {}
    for name, x in inputs.items():
        y, yq = run(ref.get_submodule(name), x), run(quant.get_submodule(name), x)
        out[name] = ((yq - y).norm() / y.norm().clamp(min=TINY)).item()
    return out


def capture_inputs(dit: nn.Module, run: Callable[[], object], names: list[str]) -> dict[str, torch.Tensor]:
    """The input each named layer receives during `run()` (its first call)."""
    seen, hooks = {}, []
    for name in names:
        hooks.append(dit.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: seen.setdefault(name, args[0].detach())))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen
