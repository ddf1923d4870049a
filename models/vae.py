"""Wan-VAE (`Wan2.1_VAE.pth`): causal 3D-conv autoencoder, 4x8x8 compression to 16 latent channels.

Video is processed causally in chunks, as in the official code: the encoder takes the first frame alone,
then 4 frames at a time; the decoder takes one latent frame at a time. Each chunk step here is stateless:
`encode_chunk` / `decode_chunk` take the caches of the previous step as a list of tensors and return fresh
ones, so an exported graph carries them as named inputs/outputs and the runtime owns the loop.

Cache list, one tensor per cached layer in execution order (shapes from `encoder_cache_shapes` /
`decoder_cache_shapes`, zeros before the first chunk):
- each causal conv (3x3x3, and the 3x1x1 `time_conv` of a temporal upsample): its last 2 input frames
  [B, C, 2, h, w]. The official cache starts as None (the conv pads 2 zero frames) and after a 1-frame chunk
  holds 1 frame (the conv pads 1 zero frame before it); a later 1-frame chunk prepends the previous
  cache's last frame. All of these equal a fixed 2-frame cache whose not-yet-seen frames are zeros.
- each temporal downsample (encoder, `downsample3d`): its last spatially downsampled frame [B, C, 1, h, w].
  The first chunk only stores it; later chunks run the stride-2 `time_conv` over [cache, x].
- each temporal upsample (decoder, `upsample3d`): the 2-frame cache of its `time_conv`. The first chunk
  skips the time_conv (one latent frame -> one video frame) and passes its zero cache through: the official
  'Rep' marker makes the next chunk pad with zeros, not with the first chunk's features.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from flf2v.models.config import VAEConfig

CACHE_T = 2  # frames of causal context of a 3-tap temporal conv


class CausalConv3d(nn.Conv3d):
    """3-tap temporal conv padded on the past side only; the past is the cache (last 2 input frames)."""

    def __init__(self, in_dim: int, out_dim: int, spatial: int):
        super().__init__(in_dim, out_dim, (3, spatial, spatial), padding=(0, spatial // 2, spatial // 2))

    def forward(self, x: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([cache, x], dim=2)
        # clone: a view would keep the whole concatenated chunk alive until the next step
        return super().forward(x), x[:, :, -CACHE_T:].clone()


class RMSNorm(nn.Module):
    """L2-normalize over channels, times sqrt(C) * gamma (official RMS_norm, no bias)."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1,) * (2 if images else 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 island: the channel norm of bf16 activations (sum of C squares) loses precision
        return (F.normalize(x.float(), dim=1) * self.scale * self.gamma.float()).type_as(x)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # a Sequential only to keep the official keys residual.{0,2,3,6}; slots 1, 4, 5 are SiLU, SiLU, dropout
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3))
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, caches: Iterator[torch.Tensor], first: bool):
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = self.shortcut(x)
        x, c1 = conv1(F.silu(norm1(x)), next(caches))
        x, c2 = conv2(F.silu(norm2(x)), next(caches))
        return x + h, [c1, c2]


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(y)).reshape(b * t, 1, 3 * c, h * w).transpose(2, 3)
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # [b*t, 1, h*w, c]
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.reshape(b, t, c, h, w).transpose(1, 2)


class Resample(nn.Module):
    """2x spatial down/upsampling per frame, plus 2x in time for the '3d' modes."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.dim, self.mode = dim, mode
        if mode in ("upsample2d", "upsample3d"):
            # 'nearest' instead of the official 'nearest-exact': at an integer 2x scale both copy source pixel
            # floor(i / 2), and 'nearest' exports to a plain ONNX Resize that TensorRT takes. Being a copy, it
            # needs no fp32 island either (the official one casts to fp32 only for old bf16 kernel support).
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown Resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, 1)
        elif mode == "downsample3d":
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x, caches: Iterator[torch.Tensor], first: bool):
        new = []
        if self.mode == "upsample3d":
            cache = next(caches)
            if first:
                # the cache stays zero ('Rep'); pass the (zero) input through rather than zeros_like, which
                # an exporter folds into a constant as large as the cache
                new.append(cache.clone())
            else:
                b, c, t, h, w = x.shape
                x, cache = self.time_conv(x, cache)
                new.append(cache)
                # channels [2, c] -> two consecutive frames per input frame
                x = x.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        b, c, t, h, w = x.shape
        x = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        x = x.reshape(b, t, *x.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d":
            cache = next(caches)
            last = x[:, :, -1:].clone()
            if not first:
                x = self.time_conv(torch.cat([cache, x], dim=2))
            new.append(last)
        return x, new


def _run(layers, x: torch.Tensor, caches: list[torch.Tensor], first: bool):
    """One chunk through a flat layer list, consuming `caches` in order; returns (x, new caches)."""
    it, new = iter(caches), []
    for layer in layers:
        if isinstance(layer, CausalConv3d):
            x, c = layer(x, next(it))
            new.append(c)
        elif isinstance(layer, (ResidualBlock, Resample)):
            x, c = layer(x, it, first)
            new += c
        else:
            x = layer(x)
    return x, new


def _cache_shapes(layers, b: int, h: int, w: int) -> list[tuple[int, ...]]:
    """Shapes of the caches `_run` consumes and emits, for input of spatial size h x w."""
    shapes = []
    for layer in layers:
        if isinstance(layer, CausalConv3d):
            shapes.append((b, layer.in_channels, CACHE_T, h, w))
        elif isinstance(layer, ResidualBlock):
            shapes += [(b, layer.residual[i].in_channels, CACHE_T, h, w) for i in (2, 6)]
        elif isinstance(layer, Resample):
            if layer.mode == "upsample3d":
                shapes.append((b, layer.dim, CACHE_T, h, w))
            h, w = (2 * h, 2 * w) if layer.mode.startswith("up") else (h // 2, w // 2)
            if layer.mode == "downsample3d":
                shapes.append((b, layer.dim, 1, h, w))
    return shapes


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim), AttentionBlock(out_dim),
                                    ResidualBlock(out_dim, out_dim))
        self.head = nn.Sequential(RMSNorm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, 2 * cfg.z_dim, 3))

    def layers(self):
        return [self.conv1, *self.downsamples, *self.middle, *self.head]


class Decoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous level's upsample conv halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, 3, 3))

    def layers(self):
        return [self.conv1, *self.middle, *self.upsamples, *self.head]


class WanVAE(nn.Module):
    """State-dict keys are those of the official `Wan2.1_VAE.pth`. Compute dtype = the weights' dtype;
    latents in and out are fp32, normalized per channel; frames out are fp32 in [-1, 1]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        z = cfg.z_dim
        self.encoder = Encoder3d(cfg)
        self.conv1 = nn.Conv3d(2 * z, 2 * z, 1)
        self.conv2 = nn.Conv3d(z, z, 1)
        self.decoder = Decoder3d(cfg)
        # fp32 and real even under a meta-device build; load weights per tensor (a `.to(bfloat16)` would round these)
        for name, values in (("mean", cfg.mean), ("std", cfg.std)):
            table = torch.tensor(values, dtype=torch.float64, device="cpu").float().view(1, z, 1, 1, 1)
            self.register_buffer(name, table, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    # ---- static cache layout -------------------------------------------------------------------------
    def encoder_cache_shapes(self, B: int, H: int, W: int) -> list[tuple[int, ...]]:
        s = self.cfg.stride[1]
        if H % s or W % s:
            raise ValueError(f"video size {H}x{W} must be a multiple of {s}")
        return _cache_shapes(self.encoder.layers(), B, H, W)

    def decoder_cache_shapes(self, B: int, h: int, w: int) -> list[tuple[int, ...]]:
        return _cache_shapes(self.decoder.layers(), B, h, w)

    def zero_caches(self, shapes, device=None) -> list[torch.Tensor]:
        return [torch.zeros(s, dtype=self.dtype, device=device) for s in shapes]

    @staticmethod
    def _check_caches(caches, shapes):
        got = [tuple(c.shape) for c in caches]
        if got != shapes:
            raise ValueError(f"caches have shapes {got}, expected {shapes}")

    # ---- stateless chunk steps (one exported graph each, two variants by `first`) ------------------------
    def encode_chunk(self, x: torch.Tensor, caches: list[torch.Tensor], first: bool):
        """x [B, 3, 1 if first else 4, H, W] in [-1, 1] -> (normalized latent (mu - mean) / std, fp32
        [B, z_dim, 1, H/8, W/8]; new caches). On the first chunk `caches` are zeros."""
        b, c, f, h, w = x.shape
        if c != 3 or f != (1 if first else self.cfg.stride[0]):
            raise ValueError(f"encoder chunk shape {tuple(x.shape)} (first={first})")
        self._check_caches(caches, self.encoder_cache_shapes(b, h, w))
        x, caches = _run(self.encoder.layers(), x.to(self.dtype), caches, first)
        mu = self.conv1(x)[:, : self.cfg.z_dim].float()
        return (mu - self.mean) / self.std, caches

    def decode_chunk(self, z: torch.Tensor, caches: list[torch.Tensor], first: bool):
        """z [B, z_dim, 1, h, w] normalized -> (frames fp32 in [-1, 1], [B, 3, 1 if first else 4, 8h, 8w];
        new caches). On the first chunk `caches` are zeros."""
        b, c, t, h, w = z.shape
        if c != self.cfg.z_dim or t != 1:
            raise ValueError(f"decoder chunk shape {tuple(z.shape)}, expected [B, {self.cfg.z_dim}, 1, h, w]")
        self._check_caches(caches, self.decoder_cache_shapes(b, h, w))
        x = self.conv2((z.float() * self.std + self.mean).to(self.dtype))
        x, caches = _run(self.decoder.layers(), x, caches, first)
        return x.float().clamp(-1.0, 1.0), caches

    # ---- whole clips ------------------------------------------------------------------------------------
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, 1+4n, H, W] in [-1, 1] -> normalized latent [B, z_dim, 1+n, H/8, W/8] (fp32)."""
        b, _, _, h, w = video.shape
        caches = self.zero_caches(self.encoder_cache_shapes(b, h, w), video.device)
        return encode_chunks(self.encode_chunk, video, caches, self.cfg.stride[0])

    def decode(self, z: torch.Tensor, progress=None, tile: int | None = None, overlap: int = 8) -> torch.Tensor:
        """normalized latent [B, z_dim, T, h, w] -> video [B, 3, 1+4(T-1), 8h, 8w] in [-1, 1] (fp32).
        `tile` (latent pixels): decode in overlapping spatial tiles of at most tile x tile (`decode_tiled`)."""
        if tile is not None:
            return decode_tiled(self, z, tile, overlap, progress)
        b, _, _, h, w = z.shape
        caches = self.zero_caches(self.decoder_cache_shapes(b, h, w), z.device)
        return decode_chunks(self.decode_chunk, z, caches, progress)


# ---- the chunk loops, shared by the reference VAE and the engine backends ---------------------------

def encode_chunks(step, video: torch.Tensor, caches: list, stride: int) -> torch.Tensor:
    """Frame 0 alone, then chunks of `stride` frames; `step(x, caches, first) -> (z, caches)`."""
    f = video.shape[2]
    if f % stride != 1:
        raise ValueError(f"frame count {f} is not 1 + {stride}n")
    out = []
    for i, x in enumerate([video[:, :, :1], *video[:, :, 1:].split(stride, dim=2)]):
        z, caches = step(x, caches, i == 0)
        out.append(z)
    return torch.cat(out, dim=2)


def decode_chunks(step, z: torch.Tensor, caches: list, progress=None) -> torch.Tensor:
    """One latent frame at a time; `step(z_i, caches, first) -> (frames, caches)`. `progress`, if
    given, wraps the chunk iterator (e.g. a tqdm partial)."""
    chunks = z.split(1, dim=2)
    out = []
    for i, zi in enumerate(progress(chunks) if progress else chunks):
        frames, caches = step(zi, caches, i == 0)
        out.append(frames)
    return torch.cat(out, dim=2)


# ---- spatially tiled decode: bounded memory at any frame size -----------------------------------------

def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of `tile` covering 0..size, neighbours overlapping by at least `overlap`; the last
    tile ends at the edge (it overlaps its neighbour more when `tile - overlap` does not divide the size)."""
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in 0..{tile - 1}")
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(n: int, lo: int, hi: int, overlap_lo: int, overlap_hi: int) -> torch.Tensor:
    """Blend weights of one tile along one axis (pixels lo..hi of an axis of n): linear ramps over the
    overlaps with the neighbours, 1 elsewhere; the frame's own edges are not ramped."""
    w = torch.ones(hi - lo)
    i = torch.arange(hi - lo, dtype=torch.float32) + 0.5
    if lo > 0 and overlap_lo > 0:
        w = torch.minimum(w, i / overlap_lo)
    if hi < n and overlap_hi > 0:
        w = torch.minimum(w, (hi - lo - i) / overlap_hi)
    return w


def decode_tiled(vae: WanVAE, z: torch.Tensor, tile: int, overlap: int, progress=None) -> torch.Tensor:
    """`vae.decode` of z [B, z_dim, T, h, w] tile by tile: each tile (tile x tile latent pixels, the last ones
    shifted to end at the edge) runs the causal decoder over all frames with its own caches, so the caches and
    activations are those of one tile; tiles are blended linearly over their overlap. The convolutions and the
    mid-block attention see only their tile, which is where tiled output differs from the untiled one (the
    seams, measured in tests/test_memory_plan.py)."""
    b, _, t, h, w = z.shape
    s = vae.cfg.stride[1]
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out = torch.zeros(b, 3, 1 + vae.cfg.stride[0] * (t - 1), h * s, w * s, device=z.device)
    weight = torch.zeros(h * s, w * s, device=z.device)
    tiles = [(r, c) for r in rows for c in cols]
    for r, c in (progress(tiles) if progress else tiles):
        r1, c1 = min(r + tile, h), min(c + tile, w)
        part = z[:, :, :, r:r1, c:c1]
        caches = vae.zero_caches(vae.decoder_cache_shapes(b, r1 - r, c1 - c), z.device)
        x = decode_chunks(vae.decode_chunk, part, caches)
        # each overlap is ramped over the pixels this tile shares with its neighbour on that side
        up = (rows[rows.index(r) - 1] + tile - r) * s if r > 0 else 0
        down = (r1 - rows[rows.index(r) + 1]) * s if r1 < h else 0
        left = (cols[cols.index(c) - 1] + tile - c) * s if c > 0 else 0
        right = (c1 - cols[cols.index(c) + 1]) * s if c1 < w else 0
        wt = torch.outer(_ramp(h * s, r * s, r1 * s, up, down), _ramp(w * s, c * s, c1 * s, left, right)).to(z.device)
        out[..., r * s:r1 * s, c * s:c1 * s] += x * wt
        weight[r * s:r1 * s, c * s:c1 * s] += wt
    return out / weight
