"""Fused Wan self-attention in Triton: RMSNorm over the full model dim (across heads), its weight and the
3D RoPE are applied to q (and optionally k) tiles as they load, then flash attention with an online
softmax and fp32 accumulators. No normed or rotated copy of q is ever written.

    q, k, v [B, L, dim] raw Linear outputs, dim = H * D
      -> _rms_stats_kernel    rstd[b, l] = 1 / sqrt(mean_c x[b, l, c]^2 + eps), fp32, for q and for k
                              (a pre-pass: the norm spans all heads, a (token, head) tile cannot see it)
      -> _norm_rope_kernel    k' = rope(norm(k)) written once (fuse_k=False, the default), or nothing
      -> self_attn_fwd_kernel, one program per (query block, batch * head): q tile = rope(norm(q tile))
            as it loads; k' tiles loaded, or each raw k tile normed and rotated as it loads (NORM_K,
            fuse_k=True: no copy of k at all); online softmax in fp32.
Why fuse_k=False is the default: with NORM_K each of the L/BLOCK_M query blocks redoes the norm/rope of
every k tile and streams fp32 cos/sin tiles as large as the k and v tiles together (double the bytes per
key block on a loop that is close to L2-bound on Hopper), and needs ~1/3 more shared memory; writing k'
once costs one pass over k (~0.5 ms at 720p against ~100+ ms of attention). Measure: bench/kernels.py.

Cast points follow the official WanRMSNorm and rope_apply (and `wan_self_attention_ref` below):
  n = (x.float() * rstd).to(x.dtype) * w     (stays fp32 when w is fp32, like torch's type promotion)
  x' = rope(n.float()).to(x.dtype)           (RoPE in fp32; the official code uses fp64 here)
then softmax(q' k'^T / sqrt(D)) v with fp32 scores, P rounded to v's dtype for the second matmul.
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import (INTERPRET, LOG2E, check_device, check_heads, config_kwargs, configs, fixed_config, head_dim_of,
                     launch, load_rows, new_output, online_softmax_step)



# ---- kernels --------------------------------------------------------------------------------------

@triton.jit
def _load_norm_rope(X, stride_xl, R, W, COS, SIN, offs_l, L, HEAD_DIM: tl.constexpr, MASK: tl.constexpr):
    """One head's [BLOCK, HEAD_DIM] tile of x, RMS-normed with rstd R, weighted by W and rotated."""
    HALF: tl.constexpr = HEAD_DIM // 2
    x = load_rows(X, stride_xl, offs_l, L, tl.arange(0, HEAD_DIM), MASK)
    cos = load_rows(COS, HALF, offs_l, L, tl.arange(0, HALF), MASK)
    sin = load_rows(SIN, HALF, offs_l, L, tl.arange(0, HALF), MASK)
    rstd = tl.load(R + offs_l, mask=offs_l < L, other=0.0)
    w = tl.load(W + tl.arange(0, HEAD_DIM))
    # Rounded to x's dtype before the weight, as WanRMSNorm's `.type_as(x) * weight`.
    n = ((x.to(tl.float32) * rstd[:, None]).to(x.dtype) * w[None, :]).to(tl.float32)
    BLOCK: tl.constexpr = x.shape[0]
    ne, no = tl.split(tl.reshape(n, (BLOCK, HALF, 2)))
    y = tl.join(ne * cos - no * sin, ne * sin + no * cos)
    return tl.reshape(y, (BLOCK, HEAD_DIM)).to(x.dtype)


@triton.jit
def _self_attn_range(acc, m_i, l_i, q, K, V, stride_kl, stride_vl, RK, WK, COS, SIN, L, lo, hi,
                     QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                     NORM_K: tl.constexpr, MASK: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        if NORM_K:
            k = _load_norm_rope(K, stride_kl, RK, WK, COS, SIN, offs_n, L, HEAD_DIM, MASK)
        else:
            k = load_rows(K, stride_kl, offs_n, L, offs_d, MASK)
        v = load_rows(V, stride_vl, offs_n, L, offs_d, MASK)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, q, k, v, offs_n, L, QK_SCALE, MASK)
    return acc, m_i, l_i


@triton.jit
def self_attn_fwd_kernel(
    Q, K, V, WQ, WK, COS, SIN, RQ, RK,  # inputs first, scalars, then outputs: TensorRT's AOT order
    L, H, stride_qb, stride_ql, stride_kb, stride_kl, stride_vb, stride_vl,
    Out,
    QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, NORM_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    col = (pid_bh % H) * HEAD_DIM
    Q += b * stride_qb + col
    K += b * stride_kb + col
    V += b * stride_vb + col
    RQ += b * L
    RK += b * L

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_norm_rope(Q, stride_ql, RQ, WQ + col, COS, SIN, offs_m, L, HEAD_DIM, True)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Full key blocks without masks, then the ragged tail (75,600 is no multiple of any block).
    n_full = (L // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _self_attn_range(acc, m_i, l_i, q, K, V, stride_kl, stride_vl, RK, WK + col, COS, SIN,
                                     L, 0, n_full, QK_SCALE, HEAD_DIM, BLOCK_N, NORM_K, False)
    acc, m_i, l_i = _self_attn_range(acc, m_i, l_i, q, K, V, stride_kl, stride_vl, RK, WK + col, COS, SIN,
                                     L, n_full, L, QK_SCALE, HEAD_DIM, BLOCK_N, NORM_K, True)

    dim = H * HEAD_DIM
    out = acc / l_i[:, None]
    O = Out + b * L * dim + col + offs_m[:, None] * dim + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(O, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < L)


@triton.jit
def _rms_stats_kernel(X, L, C, stride_xb, stride_xl, R, EPS: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_l = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_C)
    X += b * stride_xb
    ss = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        mask = (offs_l[:, None] < L) & (c0 + offs_c[None, :] < C)
        x = tl.load(X + offs_l[:, None] * stride_xl + c0 + offs_c[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        ss += x * x
    ms = tl.sum(ss, 1) / C
    tl.store(R + b * L + offs_l, tl.div_rn(1.0, tl.sqrt_rn(ms + EPS)), mask=offs_l < L)


@triton.jit
def _norm_rope_kernel(X, W, COS, SIN, R, L, H, stride_xb, stride_xl, Out,
                      HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    col = (pid_bh % H) * HEAD_DIM
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    y = _load_norm_rope(X + b * stride_xb + col, stride_xl, R + b * L, W + col, COS, SIN, offs_l, L,
                        HEAD_DIM, True)
    dim = H * HEAD_DIM
    O = Out + b * L * dim + col + offs_l[:, None] * dim + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(O, y, mask=offs_l[:, None] < L)


# ---- autotune configs -----------------------------------------------------------------------------

# Hopper (H100/H200), bf16/fp16, checked by compiling for sm_90a on a CPU (trt_plugin.compile_*): 128-row
# query tiles need 8 warps (4 spill: the fp32 accumulator alone is 128 registers a thread), 2-4 stage
# cp.async pipelines, shared memory 98-229 KB of the 227 KB. With NORM_K the fp32 cos/sin tiles are
# pipelined too (131 KB at 128x64x2): configs over the limit fail to launch and the autotuner skips them.
SELF_ATTN_CONFIGS = configs((128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
                             (128, 128, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2))
_self_attn_fwd = triton.autotune(configs=SELF_ATTN_CONFIGS, key=["L", "HEAD_DIM", "NORM_K"])(self_attn_fwd_kernel)


# ---- host wrappers --------------------------------------------------------------------------------

def check_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, num_heads) -> int:
    """Shape/dtype/stride checks (metadata only: also run on fake tensors); returns num_heads."""
    check_heads("q", q, (None, None, None))
    b, s, dim = q.shape
    check_heads("k", k, (b, s, dim), q.dtype)
    check_heads("v", v, (b, s, dim), q.dtype)
    for name, w in (("norm_q_weight", norm_q_weight), ("norm_k_weight", norm_k_weight)):
        if w.shape != (dim,) or w.dtype not in (q.dtype, torch.float32) or not w.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [{dim}] tensor in {q.dtype} or float32, got "
                             f"{tuple(w.shape)} {w.dtype} strides {w.stride()}")
    if cos.dim() != 2 or cos.shape[0] != s:
        raise ValueError(f"cos must be [L={s}, head_dim/2], got {tuple(cos.shape)}")
    if num_heads is None:
        num_heads = dim // (2 * cos.shape[1]) if cos.shape[1] and dim % (2 * cos.shape[1]) == 0 else -1
    d = head_dim_of(dim, num_heads)
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (s, d // 2) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 [{s}, {d // 2}] table, got "
                             f"{tuple(t.shape)} {t.dtype} strides {t.stride()}")
    return num_heads


def rms_stats(x: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token inverse RMS over the last dim, in fp32.

    x    [B, L, C]  fp16/bf16/fp32, unit stride along C
    out  [B, L]     fp32: 1 / sqrt(mean_c x^2 + eps)
    """
    check_heads("x", x, (None, None, None))
    check_device(x)
    b, s, c = x.shape
    out = new_output(out, (b, s), torch.float32, x.device)
    block_l, block_c = (16, 64) if INTERPRET else (16, 256)
    launch(_rms_stats_kernel)[(triton.cdiv(s, block_l), b)](x, s, c, x.stride(0), x.stride(1), out, EPS=float(eps),
                                                   BLOCK_L=block_l, BLOCK_C=block_c, num_warps=4)
    return out


def norm_rope(x, rstd, weight, cos, sin, num_heads: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMS-normed (given rstd), weighted and rotated x, materialised in x's dtype.

    x [B, L, dim], rstd [B, L] fp32, weight [dim], cos/sin [L, head_dim/2] fp32 -> [B, L, dim]
    """
    num_heads = check_self_attention(x, x, x, weight, weight, cos, sin, num_heads)
    if rstd.shape != x.shape[:2] or rstd.dtype != torch.float32 or not rstd.is_contiguous():
        raise ValueError(f"rstd must be a contiguous float32 {tuple(x.shape[:2])} tensor, got "
                         f"{tuple(rstd.shape)} {rstd.dtype}")
    check_device(x, rstd, weight, cos, sin)
    b, s, dim = x.shape
    out = new_output(out, x.shape, x.dtype, x.device)
    block_l = 16 if INTERPRET else 64
    launch(_norm_rope_kernel)[(triton.cdiv(s, block_l), b * num_heads)](
        x, weight, cos, sin, rstd, s, num_heads, x.stride(0), x.stride(1), out,
        HEAD_DIM=dim // num_heads, BLOCK_L=block_l, num_warps=4)
    return out


def wan_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, eps: float,
                       num_heads: int | None = None, *, fuse_k: bool = False,
                       out: torch.Tensor | None = None, rstd=None) -> torch.Tensor:
    """Wan self-attention from the raw projections, RMSNorm and RoPE fused into the attention kernel.

    q, k, v         [B, L, dim]     raw q/k/v Linear outputs (bias included), fp16/bf16/fp32,
                                    unit stride along dim (any batch/token strides)
    norm_q_weight,  [dim]           RMSNorm weights (norm over the full dim, across heads), in q's
    norm_k_weight                   dtype or fp32
    cos, sin        [L, D/2]        fp32 RoPE tables; pair i rotates channels (2i, 2i+1) of each head
    num_heads       H               dim = H * D; None: D = 2 * cos.shape[1]
    fuse_k          True: k tiles are normed and rotated as they load (no copy of k; every query block
                    redoes it and streams fp32 cos/sin tiles); False (default): a pre-pass writes the
                    normed, rotated k once and the key loop is plain flash attention. q is always
                    normed and rotated inside the attention kernel.
    rstd            None, or (rstd_q, rstd_k) [B, L] fp32: the tokens' 1/RMS over a wider dim than q's
                    (Ulysses: q holds H/U of the heads, the norm spans all H; models/parallel.py)
    returns         [B, L, dim]     softmax(q' k'^T / sqrt(D)) v in q's dtype, heads concatenated
    """
    num_heads = check_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, num_heads)
    check_device(q, k, v, norm_q_weight, norm_k_weight, cos, sin)
    b, s, dim = q.shape
    d = dim // num_heads
    if rstd is None:
        rq, rk = rms_stats(q, eps), rms_stats(k, eps)
    else:
        rq, rk = rstd
        for name, r in (("rstd_q", rq), ("rstd_k", rk)):
            if r.shape != (b, s) or r.dtype != torch.float32 or not r.is_contiguous():
                raise ValueError(f"{name} must be a contiguous float32 [{b}, {s}] tensor, got "
                                 f"{tuple(r.shape)} {r.dtype}")
    if not fuse_k:
        k = norm_rope(k, rk, norm_k_weight, cos, sin, num_heads)
    out = new_output(out, q.shape, q.dtype, q.device)

    def grid(meta):
        return triton.cdiv(s, meta["BLOCK_M"]), b * num_heads

    config = fixed_config(q.dtype)
    kernel = _self_attn_fwd if config is None else self_attn_fwd_kernel
    launch(kernel)[grid](q, k, v, norm_q_weight, norm_k_weight, cos, sin, rq, rk,
                 s, num_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                 out, QK_SCALE=LOG2E / math.sqrt(d), HEAD_DIM=d, NORM_K=fuse_k,
                 **config_kwargs(config))
    return out


# ---- reference ------------------------------------------------------------------------------------

def wan_self_attention_ref(q, k, v, norm_q_weight, norm_k_weight, cos, sin, eps: float,
                           num_heads: int | None = None) -> torch.Tensor:
    """PyTorch reference of `wan_self_attention` (same arguments, same cast points)."""
    b, s, dim = q.shape
    d = 2 * cos.shape[1] if num_heads is None else dim // num_heads

    def norm_rope_ref(x, w):
        xf = x.float()
        n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w
        ne, no = n.float().view(b, s, dim // d, d // 2, 2).unbind(-1)
        c, sn = cos.view(1, s, 1, d // 2), sin.view(1, s, 1, d // 2)
        return torch.stack([ne * c - no * sn, ne * sn + no * c], -1).flatten(3).to(x.dtype).transpose(1, 2)

    qh, kh = norm_rope_ref(q, norm_q_weight), norm_rope_ref(k, norm_k_weight)
    vh = v.view(b, s, dim // d, d).transpose(1, 2)
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, s, dim)
