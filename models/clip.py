"""CLIP visual tower (open-clip XLM-R ViT-H/14) up to its penultimate block, as Wan uses it.

Keys equal the official `visual.*` keys of `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`
with the `visual.` prefix removed; `ignored_keys` names the rest of that file (last block, post_norm,
head, text tower, log_scale), which the video model never runs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from flf2v.models.config import CLIPConfig

CHECKPOINT_PREFIX = "visual."


def run_dtype(dtype: torch.dtype) -> torch.dtype:
    """CLIP's compute dtype in a run of `dtype`: fp16 in a bf16 run, as the official (wan_i2v_14B.clip_dtype):
    bf16's 3 fewer mantissa bits gave 8x the error over the 32 blocks (1.3e-2 vs 1.7e-3 relative to fp32, a
    random full-size tower on the CPU)."""
    return torch.float16 if dtype == torch.bfloat16 else dtype


def ignored_keys(cfg: CLIPConfig) -> Callable[[str], bool]:
    """Predicate on the official checkpoint's keys: True for those the loader must skip."""
    skip_prefixes = ("textual.", "visual.post_norm.", f"visual.transformer.{cfg.num_layers - 1}.")
    skip_keys = {"log_scale", "visual.head"}

    def ignored(key: str) -> bool:
        return key in skip_keys or key.startswith(skip_prefixes)

    return ignored


class LayerNorm(nn.LayerNorm):
    # fp32 island: the official runs CLIP in fp16 but normalizes in fp32.
    def forward(self, x):
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, s, c))


class AttentionBlock(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = SelfAttention(cfg.dim, cfg.num_heads)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.eps)
        hidden = cfg.dim * cfg.mlp_ratio
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVisual(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.patch_embedding = nn.Conv2d(3, cfg.dim, kernel_size=p, stride=p, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))
        self.pre_norm = LayerNorm(cfg.dim, eps=cfg.eps)
        # penultimate features: the checkpoint's last block is never run, so it is not built
        self.transformer = nn.Sequential(*[AttentionBlock(cfg) for _ in range(cfg.num_layers - 1)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images [B, 3, S, S] -> penultimate-block tokens [B, num_tokens, dim] (no post-norm)."""
        s = self.cfg.image_size
        if tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images [B, 3, {s}, {s}], got {list(images.shape)}")
        x = self.patch_embedding(images.type_as(self.patch_embedding.weight)).flatten(2).transpose(1, 2)
        cls = self.cls_embedding.expand(x.shape[0], -1, -1).type_as(x)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding.type_as(x)
        return self.transformer(self.pre_norm(x))


def preprocess(frames: torch.Tensor, cfg: CLIPConfig | None = None) -> torch.Tensor:
    """Frames [B, 3, H, W] in [-1, 1] -> fp32 normalized [B, 3, S, S], as the official clip.visual()."""
    cfg = cfg or CLIPConfig()
    s = cfg.image_size
    # bicubic straight to S x S (no crop, aspect not kept), overshoot not clamped: as official
    x = F.interpolate(frames.float(), size=(s, s), mode="bicubic", align_corners=False)
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x * 0.5 + 0.5 - mean) / std
