"""torch.library triton_ops over the Triton kernels, so the DiT (attention="triton"), torch.compile,
torch.export and AOTInductor can call, trace and compile them:

    torch.ops.flf2v.wan_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, eps, num_heads=None)
    torch.ops.flf2v.wan_cross_attention(q, k_txt, v_txt, k_img, v_img, num_heads)
    torch.ops.flf2v.wan_self_attention_heads(q, k, v, norm_q_weight, norm_k_weight, cos, sin, rstd_q, rstd_k,
                                             num_heads)
    torch.ops.flf2v.wan_sage_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, eps, num_heads=None)

Arguments and results as `attention.wan_self_attention` / `cross_attention.wan_cross_attention`
(num_heads=None: head_dim = 2 * cos.shape[1]). `wan_self_attention_heads` is the self-attention on a
subset of the heads whose tokens' RMS over all heads is given (rstd_q, rstd_k [B, L] fp32; Ulysses,
models/parallel.py). `wan_sage_self_attention` is `wan_self_attention` with INT8 QK^T in the SageAttention
manner (sage_attention.wan_sage_self_attention: an 8-bit approximation, not exact). Dispatch: CUDA tensors
run the compiled kernels; CPU tensors run them through the Triton interpreter when TRITON_INTERPRET=1 was
set before flf2v.kernels was imported (slow, for tests); anything else raises, never silently falls back
to the reference. The fake implementations check shapes and dtypes and give the output metadata for
tracing (meta/fake tensors).

triton_op, not custom_op: torch.export keeps the op as one node (what the ONNX plugin export translates),
while AOTInductor and torch.compile decompose it into the kernels' launches (common.launch) and compile
them into their code, so an `flf2v-build --backend aoti --attention plugin` package runs our kernels with
no Python. Only on CUDA: the interpreter's kernels cannot be traced, so a CPU package cannot hold them.
"""
from typing import Optional

import torch

from . import attention, cross_attention, sage_attention


@torch.library.triton_op("flf2v::wan_self_attention", mutates_args=())
def wan_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, norm_q_weight: torch.Tensor,
                       norm_k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                       num_heads: Optional[int] = None) -> torch.Tensor:
    return attention.wan_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, eps, num_heads)


@wan_self_attention.register_fake
def _(q, k, v, norm_q_weight, norm_k_weight, cos, sin, eps, num_heads=None):
    attention.check_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, num_heads)
    return q.new_empty(q.shape)


@torch.library.triton_op("flf2v::wan_cross_attention", mutates_args=())
def wan_cross_attention(q: torch.Tensor, k_txt: torch.Tensor, v_txt: torch.Tensor, k_img: torch.Tensor,
                        v_img: torch.Tensor, num_heads: int) -> torch.Tensor:
    return cross_attention.wan_cross_attention(q, k_txt, v_txt, k_img, v_img, num_heads)


@wan_cross_attention.register_fake
def _(q, k_txt, v_txt, k_img, v_img, num_heads):
    cross_attention.check_cross_attention(q, k_txt, v_txt, k_img, v_img, num_heads)
    return q.new_empty(q.shape)


@torch.library.triton_op("flf2v::wan_self_attention_heads", mutates_args=())
def wan_self_attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, norm_q_weight: torch.Tensor,
                             norm_k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             rstd_q: torch.Tensor, rstd_k: torch.Tensor, num_heads: int) -> torch.Tensor:
    return attention.wan_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, 0.0, num_heads,
                                        rstd=(rstd_q, rstd_k))


@wan_self_attention_heads.register_fake
def _(q, k, v, norm_q_weight, norm_k_weight, cos, sin, rstd_q, rstd_k, num_heads):
    attention.check_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, num_heads)
    return q.new_empty(q.shape)


@torch.library.triton_op("flf2v::wan_sage_self_attention", mutates_args=())
def wan_sage_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, norm_q_weight: torch.Tensor,
                            norm_k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                            num_heads: Optional[int] = None) -> torch.Tensor:
    return sage_attention.wan_sage_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, eps, num_heads)


@wan_sage_self_attention.register_fake
def _(q, k, v, norm_q_weight, norm_k_weight, cos, sin, eps, num_heads=None):
    attention.check_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, num_heads)
    return v.new_empty(v.shape)
