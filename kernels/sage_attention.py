"""8-bit Wan self-attention in the SageAttention manner (Zhang et al., "SageAttention: Accurate 8-bit
attention for plug-and-play inference acceleration", ICLR 2025, arXiv 2410.02367; thu-ml/SageAttention),
beside the exact fused kernel of attention.py. Same arguments and result as `wan_self_attention`.

    q, k, v [B, L, dim] raw Linear outputs, dim = H * D
      -> attention.rms_stats + norm_rope   q', k' = rope(norm(x)) in x's dtype, the cast points of the spec
      -> km = mean of k' over tokens       [B, H, D] fp32, torch (one reduction; the quant kernel needs it whole)
      -> _quant_kernel                     int8 q'' = round(q' * log2e / sqrt(D) / s_q), one fp32 s_q per
                                           BLOCK_M query rows per (batch, head); int8 k'' = round((k' - km) / s_k),
                                           one s_k per BLOCK_N key rows; s = amax / 127, round half away from 0
      -> sage_fwd_kernel                   per (query block, batch * head): scores = int8 tl.dot (int32 sums)
                                           * s_q * s_k, already log2 units; online softmax in fp32; P and V in
                                           fp16 for the PV dot, fp32 accumulator; output in v's dtype.
Why smoothing is free: k - km adds -q.km to every score of a query row, and softmax ignores a per-row
constant; it removes the shared per-channel offset that real DiT keys carry and that would otherwise set
every block's int8 step (the key-to-key differences attention depends on are far smaller).
Why the quantization is a Triton pass of its own: each k block is re-read by every query block, so k is
quantized once, ahead (half the bytes of fp16 in the key loop); one pass reads x' and writes int8 and the
scales with the block geometry of the attention kernel, where torch would pad L and take several passes.
The block sizes are part of the numerics (the scales' granularity), so they are fixed (SageAttention's
BLKQ=128, BLKK=64) and only warps and stages are tuned.
Why fp16 PV: SageAttention keeps P~V in fp16 (v1) or FP8 (v2, sm89+ only). FP8 PV is a GPU-only option not
taken here; fp16 products with fp32 sums are what the Triton interpreter computes exactly too, so
`sage_attention_ref` matches the kernel tightly on a CPU. bf16 v stays bf16 (fp16 would overflow its range).
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .attention import check_self_attention, norm_rope, rms_stats
from .common import INTERPRET, LOG2E, check_device, launch, load_rows, new_output

BLOCK_M, BLOCK_N = 128, 64  # rows per q scale / per k scale (SageAttention's per-block granularity)


# ---- kernels --------------------------------------------------------------------------------------

@triton.jit
def _quant_kernel(X, stride_xb, stride_xl, MEAN, L, H, XQ, SCALE, MULT: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SUB_MEAN: tl.constexpr):
    """One [BLOCK, HEAD_DIM] tile of one head: ((x - mean) * MULT) as int8 and its scale amax / 127."""
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    col = (pid_bh % H) * HEAD_DIM
    offs_l = pid_l * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    x = load_rows(X + b * stride_xb + col, stride_xl, offs_l, L, offs_d, True).to(tl.float32)
    if SUB_MEAN:
        x -= tl.load(MEAN + pid_bh * HEAD_DIM + offs_d)[None, :]
    # Rows past L are zeroed after the mean is taken off, so they cannot raise the block's amax.
    x = tl.where(offs_l[:, None] < L, x * MULT, 0.0)
    amax = tl.max(tl.abs(x))
    scale = tl.where(amax > 0, tl.div_rn(amax, 127.0), 1.0)  # an all-zero block: any scale, all codes 0
    xs = tl.div_rn(x, scale)  # IEEE division on the GPU too: the codes equal the reference's
    xi = (xs + tl.where(xs >= 0, 0.5, -0.5)).to(tl.int8)  # the cast truncates: round half away from zero
    dim = H * HEAD_DIM
    tl.store(XQ + b * L * dim + col + offs_l[:, None] * dim + offs_d[None, :], xi, mask=offs_l[:, None] < L)
    tl.store(SCALE + pid_bh * tl.num_programs(0) + pid_l, scale)


@triton.jit
def _sage_range(acc, m_i, l_i, q, q_scale, KI, KS, V, stride_kl, stride_vl, L, lo, hi,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Fold key blocks [lo, hi) into the running (acc, row max m_i, row sum l_i); scores in log2 units."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = load_rows(KI, stride_kl, offs_n, L, offs_d, MASK)
        v = load_rows(V, stride_vl, offs_n, L, offs_d, MASK)
        s = tl.dot(q, tl.trans(k))  # int8 x int8 -> exact int32 sums
        # Dequantized, and already log2-scaled: log2e / sqrt(D) went into q's scale.
        s = s.to(tl.float32) * (q_scale * tl.load(KS + start // BLOCK_N))
        if MASK:
            s = tl.where(offs_n[None, :] < L, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v.to(tl.float16) if v.dtype == tl.float32 else v  # fp16 PV; bf16 v keeps its range
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def sage_fwd_kernel(QI, QS, KI, KS, V, L, H, stride_vb, stride_vl, Out,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query block of one (batch, head) from the int8 codes (QI, KI) and their block scales (QS, KS)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    col = (pid_bh % H) * HEAD_DIM
    dim = H * HEAD_DIM
    QI += b * L * dim + col  # the int8 copies are contiguous [B, L, dim]
    KI += b * L * dim + col
    V += b * stride_vb + col
    KS += pid_bh * tl.cdiv(L, BLOCK_N)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = load_rows(QI, dim, offs_m, L, tl.arange(0, HEAD_DIM), True)
    q_scale = tl.load(QS + pid_bh * tl.num_programs(0) + pid_m)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Full key blocks without masks, then the ragged tail.
    n_full = (L // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _sage_range(acc, m_i, l_i, q, q_scale, KI, KS, V, dim, stride_vl, L, 0, n_full,
                                HEAD_DIM, BLOCK_N, False)
    acc, m_i, l_i = _sage_range(acc, m_i, l_i, q, q_scale, KI, KS, V, dim, stride_vl, L, n_full, L,
                                HEAD_DIM, BLOCK_N, True)
    O = Out + b * L * dim + col + offs_m[:, None] * dim + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(O, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=offs_m[:, None] < L)


# ---- autotune configs -----------------------------------------------------------------------------

# Only warps and stages: the blocks are fixed by the quantization granularity (module docstring).
SAGE_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]
_sage_fwd = triton.autotune(configs=SAGE_CONFIGS, key=["L", "HEAD_DIM"])(sage_fwd_kernel)


# ---- host wrappers --------------------------------------------------------------------------------

def quantize_blocks(x, num_heads: int, block: int, mult: float, mean: torch.Tensor | None = None):
    """Per-block int8 codes of ((x - mean) * mult) and their fp32 scales.

    x     [B, L, dim] unit stride along dim, dim = num_heads * D
    mean  None, or [B, H, D] fp32 contiguous: taken off every token first (k smoothing)
    returns (int8 [B, L, dim] contiguous, fp32 scales [B * H, cdiv(L, block)])
    """
    b, s, dim = x.shape
    d = dim // num_heads
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty((b * num_heads, triton.cdiv(s, block)), dtype=torch.float32, device=x.device)
    launch(_quant_kernel)[(triton.cdiv(s, block), b * num_heads)](
        x, x.stride(0), x.stride(1), x if mean is None else mean, s, num_heads, codes, scales,
        MULT=float(mult), HEAD_DIM=d, BLOCK=block, SUB_MEAN=mean is not None, num_warps=4)
    return codes, scales


def wan_sage_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, eps: float,
                            num_heads: int | None = None) -> torch.Tensor:
    """Wan self-attention from the raw projections with INT8 QK^T (SageAttention, smoothed K).

    Arguments, checks and result as `attention.wan_self_attention` (and `models.dit.self_attention_ref`):
    q, k, v [B, L, dim] fp16/bf16/fp32, norm weights [dim], cos/sin [L, D/2] fp32, num_heads None: D from
    cos. Returns [B, L, dim] in v's dtype: an 8-bit approximation of softmax(q' k'^T / sqrt(D)) v.
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; anything else raises (common.check_device).
    """
    num_heads = check_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, num_heads)
    check_device(q, k, v, norm_q_weight, norm_k_weight, cos, sin)
    b, s, dim = q.shape
    d = dim // num_heads
    qn = norm_rope(q, rms_stats(q, eps), norm_q_weight, cos, sin, num_heads)
    kn = norm_rope(k, rms_stats(k, eps), norm_k_weight, cos, sin, num_heads)
    k_mean = kn.view(b, s, num_heads, d).float().mean(1)  # [B, H, D]
    q8, q_scales = quantize_blocks(qn, num_heads, BLOCK_M, LOG2E / math.sqrt(d))
    k8, k_scales = quantize_blocks(kn, num_heads, BLOCK_N, 1.0, k_mean)
    out = new_output(None, v.shape, v.dtype, v.device)
    # Fixed launch in the interpreter (one program at a time: nothing to tune), tuned on a GPU.
    kernel, kwargs = (sage_fwd_kernel, {"num_warps": 4, "num_stages": 1}) if INTERPRET else (_sage_fwd, {})
    launch(kernel)[(triton.cdiv(s, BLOCK_M), b * num_heads)](
        q8, q_scales, k8, k_scales, v, s, num_heads, v.stride(0), v.stride(1), out,
        HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **kwargs)
    return out


# ---- reference ------------------------------------------------------------------------------------

def _norm_rope_ref(x, w, cos, sin, eps: float, num_heads: int) -> torch.Tensor:
    """rope(RMSNorm(x) * w) per head as [B, H, L, D] in x's dtype (the casts of wan_self_attention_ref)."""
    b, s, dim = x.shape
    d = dim // num_heads
    xf = x.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w
    ne, no = n.float().view(b, s, num_heads, d // 2, 2).unbind(-1)
    c, sn = cos.view(1, s, 1, d // 2), sin.view(1, s, 1, d // 2)
    return torch.stack([ne * c - no * sn, ne * sn + no * c], -1).flatten(3).to(x.dtype).transpose(1, 2)


def quantize_blocks_ref(x: torch.Tensor, block: int, mult: float):
    """`quantize_blocks` in torch on x [B, H, L, D] fp32 (mean already taken off): the integer codes as
    fp32 [B, H, L, D] and the scales [B, H, cdiv(L, block)], with the kernel's fp32 operations in its order."""
    b, h, s, d = x.shape
    n = triton.cdiv(s, block)
    xb = F.pad(x * torch.tensor(mult, dtype=torch.float32), (0, 0, 0, n * block - s)).view(b, h, n, block, d)
    amax = xb.abs().amax((-2, -1), keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, 1.0)
    xs = xb / scale
    codes = torch.trunc(xs + torch.where(xs >= 0, 0.5, -0.5))
    return codes.view(b, h, n * block, d)[:, :, :s], scale.view(b, h, n)


def sage_attention_ref(q, k, v, norm_q_weight, norm_k_weight, cos, sin, eps: float,
                       num_heads: int | None = None, *, smooth_k: bool = True) -> torch.Tensor:
    """PyTorch reference of `wan_sage_self_attention`: the same quantized algorithm in one softmax.
    smooth_k=False quantizes k' as it is (what smoothing saves; for tests)."""
    b, s, dim = q.shape
    h = dim // (2 * cos.shape[1]) if num_heads is None else num_heads
    d = dim // h
    qh = _norm_rope_ref(q, norm_q_weight, cos, sin, eps, h).float()
    kh = _norm_rope_ref(k, norm_k_weight, cos, sin, eps, h).float()
    if smooth_k:
        kh = kh - kh.mean(2, keepdim=True)
    qc, qs = quantize_blocks_ref(qh, BLOCK_M, LOG2E / math.sqrt(d))
    kc, ks = quantize_blocks_ref(kh, BLOCK_N, 1.0)
    # Integer products summed in fp32 are exact while D * 127^2 < 2^24 (D <= 1040), as the kernel's int32.
    scale = qs.repeat_interleave(BLOCK_M, -1)[..., :s, None] * ks.repeat_interleave(BLOCK_N, -1)[..., None, :s]
    scores = (qc @ kc.transpose(-1, -2)) * scale
    p = torch.exp2(scores - scores.amax(-1, keepdim=True))
    pv = torch.bfloat16 if v.dtype == torch.bfloat16 else torch.float16
    vh = v.view(b, s, h, d).transpose(1, 2).to(pv).float()
    out = (p.to(pv).float() @ vh) / p.sum(-1, keepdim=True)
    return out.transpose(1, 2).reshape(b, s, dim).to(v.dtype)
