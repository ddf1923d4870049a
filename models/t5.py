"""umT5-XXL text encoder, keyed exactly like `models_t5_umt5-xxl-enc-bf16.pth`.

Same math as the official `T5Encoder(shared_pos=False)`: no 1/sqrt(d) attention scaling, one relative
position bias table per layer (bidirectional log buckets), gated GELU(tanh) FFN, T5 RMSNorm, fp16 overflow
clamp after each residual add.

Output differs in form only: the official pipeline trims each prompt's features to its real length and
the DiT zero-pads them back to text_len; here padded positions are multiplied by the mask (zeroed), which
gives the same DiT input without a per-prompt Python loop, so the encoder exports as one static graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from flf2v.models.config import T5Config


def relative_buckets(length: int, num_buckets: int, max_distance: int) -> torch.Tensor:
    """[length, length] int64 bucket of (key position - query position), bidirectional T5 scheme."""
    pos = torch.arange(length, dtype=torch.int64, device="cpu")
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2  # one half per direction
    exact = half // 2  # distances below this get a bucket each
    dist = rel.abs()
    # float64 log; the bucket edges (distances 16, 32, 64 for 32 buckets / 128) are exact powers of two,
    # where the official fp32 CPU computation lands on the same integers.
    ratio = torch.log(dist.clamp(min=1).double() / exact) / math.log(max_distance / exact)
    large = (exact + (ratio * (half - exact)).long()).clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(dist < exact, dist, large)


def fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    # The official clamps an fp16 residual stream only when it overflowed somewhere; a select on the
    # global any() keeps that exact behaviour without a data-dependent branch.
    if x.dtype != torch.float16:
        return x
    c = torch.finfo(torch.float16).max - 1000
    return torch.where(torch.isinf(x).any(), x.clamp(-c, c), x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalize in fp32; like T5, round to the weight's dtype before the scale (fp32 weights: no rounding).
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * x.type_as(self.weight)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, H*D] with an explicit copy. With a bias that needs grad (computed from the
    position embedding), the traced CPU SDPA reports a [B, L, H, D]-strided output, so a reshape traces as
    a free view that breaks when the ONNX exporter decomposes SDPA into its [B, H, L, D] math form."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).clone(memory_format=torch.contiguous_format).view(b, s, h * d)


class Attention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.o = nn.Linear(cfg.dim_attn, cfg.dim, bias=False)

    def forward(self, x, bias):
        b, s, _ = x.shape
        q, k, v = (f(x).view(b, s, self.num_heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        # T5 folds the 1/sqrt(d) into its trained weights: scale 1.
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(merge_heads(x))


class FeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.gate(x))


class RelativeBias(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.embedding = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def forward(self, buckets):
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, heads, Lq, Lk]


class Block(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = FeedForward(cfg)
        self.pos_embedding = RelativeBias(cfg)

    def forward(self, x, buckets, keep):
        # Like the official: masked keys get exactly finfo.min (not bias + min) in the activation dtype.
        bias = torch.where(keep, self.pos_embedding(buckets).to(x.dtype), torch.finfo(x.dtype).min)
        x = fp16_clamp(x + self.attn(self.norm1(x), bias))
        return fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        buckets = relative_buckets(cfg.text_len, cfg.num_buckets, cfg.max_distance)
        self.register_buffer("buckets", buckets, persistent=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask [B, L] (L <= text_len) -> fp32 [B, L, dim], padded positions zero."""
        n = ids.shape[1]
        if n > self.cfg.text_len:
            raise ValueError(f"sequence length {n} exceeds text_len {self.cfg.text_len}")
        buckets = self.buckets[:n, :n]  # buckets depend on j - i only: a corner of the table is exact
        keep = mask.bool()[:, None, None, :]
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, buckets, keep)
        return self.norm(x).float() * mask[..., None].float()
