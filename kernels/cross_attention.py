"""Fused Wan i2v/flf2v cross-attention in Triton: one launch computes
softmax(q k_txt^T / sqrt(D)) v_txt + softmax(q k_img^T / sqrt(D)) v_img, two separate unmasked softmaxes
over 512 text keys and 257 (i2v) or 514 (flf2v) image keys, summed in fp32 before the single store.

The official block sums the two attention outputs after each is rounded to the run dtype; summing in fp32
and rounding once differs from it by at most about one rounding of the output (and is closer to fp64).
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import (LOG2E, check_device, check_heads, config_kwargs, configs, fixed_config, head_dim_of, launch,
                     load_rows, new_output, online_softmax_step)


# ---- kernel ---------------------------------------------------------------------------------------

@triton.jit
def _attention(q, K, V, stride_kl, stride_vl, LK, QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """softmax(q K^T) V for one [BLOCK_M, HEAD_DIM] query tile against LK keys, fp32, normalised."""
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([q.shape[0], HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([q.shape[0]], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([q.shape[0]], dtype=tl.float32)
    n_full = (LK // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = load_rows(K, stride_kl, offs_n, LK, offs_d, False)
        v = load_rows(V, stride_vl, offs_n, LK, offs_d, False)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, q, k, v, offs_n, LK, QK_SCALE, False)
    for start in range(n_full, LK, BLOCK_N):  # the ragged tail (257, 514 keys): at most one block
        offs_n = start + tl.arange(0, BLOCK_N)
        k = load_rows(K, stride_kl, offs_n, LK, offs_d, True)
        v = load_rows(V, stride_vl, offs_n, LK, offs_d, True)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, q, k, v, offs_n, LK, QK_SCALE, True)
    return acc / l_i[:, None]


@triton.jit
def cross_attn_fwd_kernel(
    Q, KT, VT, KI, VI,  # inputs first, scalars, then outputs: TensorRT's AOT order
    LQ, LT, LI, H, stride_qb, stride_ql, stride_ktb, stride_ktl, stride_vtb, stride_vtl,
    stride_kib, stride_kil, stride_vib, stride_vil,
    Out,
    QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    col = (pid_bh % H) * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = load_rows(Q + b * stride_qb + col, stride_ql, offs_m, LQ, offs_d, True)
    out = _attention(q, KT + b * stride_ktb + col, VT + b * stride_vtb + col, stride_ktl, stride_vtl, LT,
                     QK_SCALE, HEAD_DIM, BLOCK_N)
    out += _attention(q, KI + b * stride_kib + col, VI + b * stride_vib + col, stride_kil, stride_vil, LI,
                      QK_SCALE, HEAD_DIM, BLOCK_N)
    dim = H * HEAD_DIM
    O = Out + b * LQ * dim + col + offs_m[:, None] * dim + offs_d[None, :]
    tl.store(O, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < LQ)


# ---- autotune configs -----------------------------------------------------------------------------

# Hopper, bf16/fp16 (compiled for sm_90a): few keys (1,026 in all), the query tile carries the work. The
# first result stays live through the second softmax, so 128-row tiles need 8 warps and 64-key blocks
# (128x64x4 and 128x128x8 spill); 98-131 KB of shared memory.
CROSS_ATTN_CONFIGS = configs((128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3))

_cross_attn_fwd = triton.autotune(CROSS_ATTN_CONFIGS, key=["LQ", "LT", "LI", "HEAD_DIM"])(cross_attn_fwd_kernel)


# ---- host wrapper ---------------------------------------------------------------------------------

def check_cross_attention(q, k_txt, v_txt, k_img, v_img, num_heads: int) -> None:
    """Shape/dtype/stride checks (metadata only: also run on fake tensors)."""
    check_heads("q", q, (None, None, None))
    b, _, dim = q.shape
    head_dim_of(dim, num_heads)
    check_heads("k_txt", k_txt, (b, None, dim), q.dtype)
    check_heads("v_txt", v_txt, (b, k_txt.shape[1], dim), q.dtype)
    check_heads("k_img", k_img, (b, None, dim), q.dtype)
    check_heads("v_img", v_img, (b, k_img.shape[1], dim), q.dtype)
    if k_txt.shape[1] == 0 or k_img.shape[1] == 0:
        raise ValueError(f"need at least one text and one image key, got {k_txt.shape[1]} and {k_img.shape[1]}")


def wan_cross_attention(q, k_txt, v_txt, k_img, v_img, num_heads: int, *,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Wan i2v/flf2v cross-attention: text and image attention in one launch, summed.

    q               [B, Lq, dim]   normed query projection, fp16/bf16/fp32, dim = num_heads * D
    k_txt, v_txt    [B, Lt, dim]   text keys (normed) and values, Lt = 512 in Wan
    k_img, v_img    [B, Li, dim]   image keys (normed) and values, Li = 257 (i2v) or 514 (flf2v)
                                   all with unit stride along dim (any batch/token strides)
    returns         [B, Lq, dim]   softmax(q k_txt^T/sqrt(D)) v_txt + softmax(q k_img^T/sqrt(D)) v_img
    """
    check_cross_attention(q, k_txt, v_txt, k_img, v_img, num_heads)
    check_device(q, k_txt, v_txt, k_img, v_img)
    b, lq, dim = q.shape
    d = dim // num_heads
    out = new_output(out, q.shape, q.dtype, q.device)

    def grid(meta):
        return triton.cdiv(lq, meta["BLOCK_M"]), b * num_heads

    config = fixed_config(q.dtype)
    kernel = _cross_attn_fwd if config is None else cross_attn_fwd_kernel
    launch(kernel)[grid](q, k_txt, v_txt, k_img, v_img, lq, k_txt.shape[1], k_img.shape[1], num_heads,
                 q.stride(0), q.stride(1), k_txt.stride(0), k_txt.stride(1), v_txt.stride(0), v_txt.stride(1),
                 k_img.stride(0), k_img.stride(1), v_img.stride(0), v_img.stride(1),
                 out, QK_SCALE=LOG2E / math.sqrt(d), HEAD_DIM=d, **config_kwargs(config))
    return out


# ---- reference ------------------------------------------------------------------------------------

def wan_cross_attention_ref(q, k_txt, v_txt, k_img, v_img, num_heads: int) -> torch.Tensor:
    """PyTorch reference of `wan_cross_attention`, summing like the official block (in q's dtype)."""
    def heads(x):
        return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)

    qh = heads(q)
    out = (F.scaled_dot_product_attention(qh, heads(k_txt), heads(v_txt))
           + F.scaled_dot_product_attention(qh, heads(k_img), heads(v_img)))
    return out.transpose(1, 2).flatten(2)
