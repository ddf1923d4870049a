"""Wan2.1 DiT (WanModel) for FLF2V / I2V, written export-ready.

Same maths and state-dict keys as the official `wan/modules/model.py`, with these changes:
- batched tensors in and out; no padding or masking: every sample of a batch has the same token count,
  which is what the official code computes when it pads to the exact token count.
- the float64 time sinusoid is a precomputed table indexed by the integer timestep, and the float64
  complex RoPE is a real cos/sin rotation in fp32 with tables computed in float64: same values to
  fp32 rounding, and no complex dtypes or per-sample loops for an exporter to trip on.
- the image and text context are kept apart instead of concatenated and split again.
Run dtype is the parameter dtype. The fp32 islands are where the official code (run under bf16
autocast) computes in fp32: the time embedding and every modulation, LayerNorms, q/k RMSNorm, RoPE,
the head, and the residual stream itself (the official `x + y * e` promotes it to fp32).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flf2v.models.config import DiTConfig
from flf2v.models.quant import check_quant, quantize_dit

ATTENTION_KINDS = ("sdpa", "triton", "sage")  # sage: 8-bit self-attention (kernels/sage_attention.py)


# ---- fixed tables (float64 once, stored fp32) ----------------------------------------------------

def sinusoid_table(num_timesteps: int, dim: int) -> torch.Tensor:
    """[num_timesteps, dim] = [cos | sin](t * 10000^(-i/half)) for every integer t, in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device="cpu") / half)
    angles = torch.outer(torch.arange(num_timesteps, dtype=torch.float64, device="cpu"), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_tables(max_pos: int, split: tuple[int, ...], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_pos, sum(split)] in float64: per axis, pair i turns at theta^(-2i/d_axis)."""
    pos = torch.arange(max_pos, dtype=torch.float64, device="cpu")
    angles = []
    for pairs in split:
        d = 2 * pairs
        angles.append(torch.outer(pos, theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d)))
    angles = torch.cat(angles, dim=1)
    return torch.cos(angles), torch.sin(angles)


def rope_grid(cos: torch.Tensor, sin: torch.Tensor, split: tuple[int, ...], f: int, h: int, w: int):
    """Per-token cos, sin [f*h*w, sum(split)] for a (frame, height, width) grid, frame-major."""
    if max(f, h, w) > cos.shape[0]:
        raise ValueError(f"grid {(f, h, w)} exceeds the {cos.shape[0]} RoPE positions")

    def grid(table):
        tf, th, tw = table.split(split, dim=1)
        return torch.cat([tf[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                          th[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                          tw[:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, -1)

    return grid(cos), grid(sin)


# ---- attention ------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (returns fp32). As the official WanRMSNorm under autocast: statistics
    in fp32, the normed x rounded to x's dtype, then scaled by the (fp32 in the official run) weight."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x).float() * weight.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [B, L, heads, head_dim] by cos/sin [L, head_dim/2]."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def self_attention_ref(q, k, v, norm_q_weight, norm_k_weight, cos, sin, eps: float) -> torch.Tensor:
    """Self-attention from the raw projections q, k, v [B, L, dim] -> [B, L, dim] (v's dtype).

    RMSNorm spans the full dim (all heads) and, like RoPE, runs in fp32; attention runs in v's dtype.
    """
    d = 2 * cos.shape[-1]
    q = apply_rope(rms_norm(q, norm_q_weight, eps).unflatten(-1, (-1, d)), cos, sin).to(v.dtype)
    k = apply_rope(rms_norm(k, norm_k_weight, eps).unflatten(-1, (-1, d)), cos, sin).to(v.dtype)
    v = v.unflatten(-1, (-1, d))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def cross_attention_ref(q, k_txt, v_txt, k_img, v_img, num_heads: int) -> torch.Tensor:
    """attn(q, text) + attn(q, image), both unmasked; q and keys already normed. [B, L, dim]."""
    def heads(x):
        return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)

    q = heads(q)
    out = (F.scaled_dot_product_attention(q, heads(k_txt), heads(v_txt))
           + F.scaled_dot_product_attention(q, heads(k_img), heads(v_img)))
    return out.transpose(1, 2).flatten(2)


def attention_ops(kind: str):
    """(self-attention, cross-attention) callables for `kind`, with the signatures of the *_ref ones."""
    if kind == "sdpa":
        return self_attention_ref, cross_attention_ref
    if kind in ("triton", "sage"):
        # sage: the self-attention (71.6% of a 720p forward) in 8 bits; the short cross-attention stays exact
        try:
            import flf2v.kernels.ops  # noqa: F401  (registers torch.ops.flf2v.*)
            ops = torch.ops.flf2v
            return (ops.wan_self_attention if kind == "triton" else ops.wan_sage_self_attention,
                    ops.wan_cross_attention)
        except (ImportError, AttributeError, RuntimeError) as err:
            raise RuntimeError(f"attention={kind!r} needs the flf2v Triton ops (torch.ops.flf2v.*) from "
                               f"flf2v.kernels: {err}") from err
    raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")


# ---- modules --------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps).type_as(x)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the weights' dtype; returns fp32."""

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


def linear32(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return F.linear(x.float(), layer.weight.float(), layer.bias.float())


class SelfAttention(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, cos, sin, attn):
        # fp32 norm weights: the official checkpoint stores them fp32 and the product stays fp32
        out = attn(self.q(x), self.k(x), self.v(x), self.norm_q.weight.float(), self.norm_k.weight.float(),
                   cos, sin, self.eps)
        return self.o(out)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o, self.k_img, self.v_img = (nn.Linear(dim, dim) for _ in range(6))
        self.norm_q, self.norm_k, self.norm_k_img = (RMSNorm(dim, eps) for _ in range(3))

    def forward(self, x, txt, img, attn):
        out = attn(self.norm_q(self.q(x)), self.norm_k(self.k(txt)), self.v(txt),
                   self.norm_k_img(self.k_img(img)), self.v_img(img), self.num_heads)
        return self.o(out)


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = SelfAttention(cfg.dim, cfg.eps)
        self.norm3 = FP32LayerNorm(cfg.dim, eps=cfg.eps)
        self.cross_attn = CrossAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def norm(self, x):
        return F.layer_norm(x.float(), x.shape[-1:], eps=self.eps)

    def forward(self, x, e0, txt, img, cos, sin, attn_ops):
        """x [B, L, dim] fp32 residual, e0 [B, 6, dim] fp32, txt/img [B, *, dim] in the run dtype."""
        dt = self.modulation.dtype  # the run dtype (an FP8 DiT's linears hold float8 weights)
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).chunk(6, dim=1)
        h = (self.norm(x) * (1 + scale1) + shift1).to(dt)
        x = x + self.self_attn(h, cos, sin, attn_ops[0]).float() * gate1
        x = x + self.cross_attn(self.norm3(x).to(dt), txt, img, attn_ops[1]).float()
        h = (self.norm(x) * (1 + scale2) + shift2).to(dt)
        return x + self.ffn(h).float() * gate2


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        """All fp32, weights included: the official head runs inside an fp32 autocast region."""
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        h = F.layer_norm(x.float(), x.shape[-1:], eps=self.eps) * (1 + scale) + shift
        return linear32(h, self.head)


class ImageEmbedding(nn.Module):
    """CLIP tokens [B, clip_tokens, clip_dim] -> [B, clip_tokens, dim] (fp32); `emb_pos` for flf2v only."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        # nn.LayerNorm's default eps (1e-5) as in the official MLPProj, not cfg.eps.
        self.proj = nn.Sequential(FP32LayerNorm(cfg.clip_dim), nn.Linear(cfg.clip_dim, cfg.clip_dim), nn.GELU(),
                                  nn.Linear(cfg.clip_dim, cfg.dim), FP32LayerNorm(cfg.dim))
        self.emb_pos = nn.Parameter(torch.zeros(1, cfg.clip_tokens, cfg.clip_dim)) \
            if cfg.model_type == "flf2v" else None

    def forward(self, clip_fea):
        x = clip_fea.float()
        if self.emb_pos is not None:
            x = x + self.emb_pos.float()
        x = self.proj[0](x).to(self.proj[1].weight.dtype)
        return self.proj[4](self.proj[3](self.proj[2](self.proj[1](x))))


class WanDiT(nn.Module):
    TABLES = ("time_table", "rope_cos", "rope_sin")

    def __init__(self, cfg: DiTConfig, attention: str = "sdpa", quant: str = "none"):
        """quant="fp8": the blocks' linears are models.quant.FP8Linear (their state dict has FP8 weights and
        `weight_scale`s; models.quant.fp8_source turns a checkpoint's tensors into those)."""
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        self.cfg = cfg
        self.attention = attention
        self.quant = "none"
        self.sp = None  # a models.parallel.SequenceParallel: Ulysses over its ranks
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.img_emb = ImageEmbedding(cfg)
        cos, sin = rope_tables(cfg.rope_max_pos, cfg.rope_split, cfg.rope_theta)
        # rows t = 0..num_train_timesteps: dpm++ (official get_sampling_sigmas) starts at sigma 1, t = 1000
        self.register_buffer("time_table", sinusoid_table(cfg.num_train_timesteps + 1, cfg.freq_dim).float(),
                             persistent=False)
        self.register_buffer("rope_cos", cos.float(), persistent=False)
        self.register_buffer("rope_sin", sin.float(), persistent=False)
        if check_quant(quant) == "fp8":
            quantize_dit(self)

    def _apply(self, fn, recurse=True):
        # `.to(torch.bfloat16)`, `.half()` or `.to_empty(device=...)` would round or wipe the fixed
        # tables: they follow the module's device only and stay fp32.
        tables = {name: self._buffers.pop(name) for name in self.TABLES}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, table in tables.items():
                self._buffers[name] = table.to(fn(table[:0]).device)
        return self

    def check_inputs(self, x, t, context, clip_fea, y):
        cfg = self.cfg
        b, c, f, h, w = x.shape
        p = cfg.patch_size
        want = {"x": (b, cfg.out_dim, f, h, w), "t": (b,), "context": (b, cfg.text_len, cfg.text_dim),
                "clip_fea": (b, cfg.clip_tokens, cfg.clip_dim), "y": (b, cfg.in_dim - cfg.out_dim, f, h, w)}
        for name, got in zip(want, (x, t, context, clip_fea, y)):
            if tuple(got.shape) != want[name]:
                raise ValueError(f"{name} has shape {tuple(got.shape)}, expected {want[name]}")
        if f % p[0] or h % p[1] or w % p[2]:
            raise ValueError(f"latent size {(f, h, w)} is not a multiple of the patch size {p}")

    # ---- the forward in pieces: the step cache (runtime/cache.py) runs the blocks or skips them ---------
    def tokens(self, x, y) -> torch.Tensor:
        """Patch embedding of [x, y]: [B, T, hp, wp, dim] fp32 (the blocks' input, token grid frame-major)."""
        b, _, f, hh, ww = x.shape
        p = self.cfg.patch_size
        # the grid spelled from x's dims, so an exporter sees T, H/2, W/2 (not the conv's own symbols)
        grid = (b, self.cfg.dim, f // p[0], hh // p[1], ww // p[2])
        h = self.patch_embedding(torch.cat([x, y], dim=1).to(self.patch_embedding.weight.dtype)).reshape(grid)
        return h.permute(0, 2, 3, 4, 1).float()

    def time(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(e [B, dim] for the head, e0 [B, 6, dim] for the blocks' modulation), fp32."""
        e = linear32(F.silu(linear32(self.time_table.index_select(0, t), self.time_embedding[0])),
                     self.time_embedding[2])
        return e, linear32(F.silu(e), self.time_projection[1]).unflatten(1, (6, self.cfg.dim))

    def block_inputs(self, h, context, clip_fea):
        """What every block takes besides e0: tokens x [B, L, dim] fp32 (h [B, T, hp, wp, dim] flattened),
        text and image features [B, *, dim] in the run dtype, RoPE cos, sin [L, head_dim / 2] fp32."""
        dt = self.patch_embedding.weight.dtype
        _, f, hh, ww, _ = h.shape
        cos, sin = rope_grid(self.rope_cos, self.rope_sin, self.cfg.rope_split, f, hh, ww)
        return h.flatten(1, 3), self.text_embedding(context.to(dt)), self.img_emb(clip_fea).to(dt), cos, sin

    def blocks_forward(self, h, e0, context, clip_fea) -> torch.Tensor:
        """The transformer blocks on the token grid h [B, T, hp, wp, dim] -> same shape, fp32."""
        cfg = self.cfg
        attn_ops = attention_ops(self.attention)
        x, txt, img, cos, sin = self.block_inputs(h, context, clip_fea)
        if self.sp is not None:  # Ulysses (models/parallel.py): this rank's token shard through the blocks
            n = x.shape[1]
            attn_ops = (self.sp.attention(self.attention, cos, sin, n, cfg.num_heads), attn_ops[1])
            x, cos, sin = self.sp.shard(x), self.sp.shard(cos, 0), self.sp.shard(sin, 0)
        for block in self.blocks:
            x = block(x, e0, txt, img, cos, sin, attn_ops)
        if self.sp is not None:
            x = self.sp.gather(x, n)
        return x.view(h.shape)

    def unpatchify(self, h, e) -> torch.Tensor:
        """Head on the blocks' output h [B, T, hp, wp, dim] -> flow [B, out_dim, F, H, W] fp32."""
        b, f, hh, ww, _ = h.shape
        pf, ph, pw = self.cfg.patch_size
        x = self.head(h.flatten(1, 3), e)
        x = x.view(b, f, hh, ww, pf, ph, pw, self.cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, self.cfg.out_dim, f * pf, hh * ph, ww * pw)

    def forward(self, x, t, context, clip_fea, y, return_hidden: bool = False):
        """x [B,16,F,H,W] noisy latent, t [B] int64, context [B,512,text_dim] (zero-padded T5 features),
        clip_fea [B, clip_tokens, clip_dim], y [B,20,F,H,W] (mask + latent) -> flow [B,16,F,H,W] fp32;
        with `return_hidden` also the blocks' output [B, T, hp, wp, dim] fp32 (what a cached step reuses)."""
        self.check_inputs(x, t, context, clip_fea, y)
        e, e0 = self.time(t)
        hidden = self.blocks_forward(self.tokens(x, y), e0, context, clip_fea)
        v = self.unpatchify(hidden, e)
        return (v, hidden) if return_hidden else v

    def forward_cached(self, x, x_prev, t, y, hidden):
        """A step that skips the blocks: their residual at the last computed step, hidden - tokens(x_prev),
        added to this step's tokens (TeaCache / MagCache). x, x_prev [B,16,F,H,W], t [B], y [B,20,F,H,W],
        hidden [B, T, hp, wp, dim] (`forward(..., return_hidden=True)` at x_prev) -> flow, fp32."""
        residual = hidden - self.tokens(x_prev, y)
        return self.unpatchify(self.tokens(x, y) + residual, self.time(t)[0])
