"""Sizes of the four networks from their configs alone (no weights, no meta build): parameter counts, the bytes
a run holds per network in its dtype (and quantization), and estimates of the activations a stage needs. The
memory planner (runtime/memory_plan.py) and the cost model (bench/cost.py) use them; tests check them against
meta-device builds of the networks and against live-tensor counts of real runs (tests/test_memory_plan.py)."""
from __future__ import annotations

import dataclasses
import math
from functools import lru_cache

from flf2v.models.config import CLIPConfig, DiTConfig, Preset, T5Config, VAEConfig


def dit_block_linear_params(cfg: DiTConfig) -> int:
    """Weights (no biases) of the blocks' linears: the ones an FP8 DiT stores in 1 byte."""
    return cfg.num_layers * (10 * cfg.dim ** 2 + 2 * cfg.dim * cfg.ffn_dim)


def dit_params(cfg: DiTConfig) -> int:
    d, f, patch = cfg.dim, cfg.ffn_dim, math.prod(cfg.patch_size)
    lin = lambda i, o: i * o + o  # noqa: E731
    block = (6 * d  # modulation
             + 4 * lin(d, d) + 2 * d  # self-attention, q/k RMSNorm
             + 2 * d  # norm3 (affine)
             + 6 * lin(d, d) + 3 * d  # cross-attention (text q/k/v/o + image k/v), 3 RMSNorms
             + lin(d, f) + lin(f, d))
    c = cfg.clip_dim
    img = (cfg.clip_tokens * c if cfg.model_type == "flf2v" else 0) + 2 * c + lin(c, c) + lin(c, d) + 2 * d
    return (lin(cfg.in_dim * patch, d) + lin(cfg.text_dim, d) + lin(d, d) + lin(cfg.freq_dim, d) + lin(d, d)
            + lin(d, 6 * d) + cfg.num_layers * block + 2 * d + lin(d, cfg.out_dim * patch) + img)


def t5_params(cfg: T5Config, with_embedding: bool = True) -> int:
    d = cfg.dim
    layer = 4 * d * cfg.dim_attn + 3 * d * cfg.ffn_dim + 2 * d + cfg.num_buckets * cfg.num_heads
    return (cfg.vocab * d if with_embedding else 0) + cfg.num_layers * layer + d


def clip_params(cfg: CLIPConfig) -> int:
    """The part that runs: embeddings, pre-norm and num_layers - 1 blocks."""
    d, h = cfg.dim, cfg.dim * cfg.mlp_ratio
    block = 4 * d * d + 4 * d + d * h + h + h * d + d + 4 * d
    return 3 * cfg.patch_size ** 2 * d + d + cfg.num_tokens * d + 2 * d + (cfg.num_layers - 1) * block

def dit_block_params(cfg: DiTConfig) -> tuple[int, int]:
    """(linear weights, everything else) of one block: the first are what an FP8 DiT stores in 1 byte."""
    d, f = cfg.dim, cfg.ffn_dim
    linear = 10 * d * d + 2 * d * f
    return linear, (dit_params(cfg) - dit_outer_params(cfg)) // cfg.num_layers - linear


def dit_outer_params(cfg: DiTConfig) -> int:
    """Embeddings, time MLPs and head: the DiT without its blocks (resident whatever the plan)."""
    one, two = (dit_params(dataclasses.replace(cfg, num_layers=n)) for n in (1, 2))
    return 2 * one - two


# ---- bytes a run holds ------------------------------------------------------------------------------------

def dit_block_bytes(cfg: DiTConfig, dtype_bytes: int, quant: str = "none") -> int:
    """One block in the run dtype; "fp8": its linear weights in 1 byte plus one fp32 scale per output channel."""
    linear, other = dit_block_params(cfg)
    if quant == "fp8":
        return linear + 4 * (11 * cfg.dim + cfg.ffn_dim) + other * dtype_bytes
    return (linear + other) * dtype_bytes


def weight_bytes(preset: Preset, dtype_bytes: int, quant: str = "none") -> dict[str, int]:
    """Bytes of each network's weights as a run holds them: "dit_outer", "dit_block" (one of num_layers),
    "t5", "clip", "vae" (both halves: the torch backend keeps one VAE)."""
    d = preset.dit
    return {"dit_outer": dit_outer_params(d) * dtype_bytes, "dit_block": dit_block_bytes(d, dtype_bytes, quant),
            "t5": t5_params(preset.t5) * dtype_bytes, "clip": clip_params(preset.clip) * dtype_bytes,
            "vae": vae_params(preset.vae) * dtype_bytes}


@lru_cache(maxsize=None)
def vae_params(cfg: VAEConfig) -> int:
    """Encoder, decoder and the two 1x1 convs of the Wan-VAE."""
    import torch

    from flf2v.models.vae import WanVAE
    with torch.device("meta"):
        vae = WanVAE(cfg)
    return sum(p.numel() for p in vae.parameters())


# ---- activations: estimates checked against live-tensor counts (tests/test_memory_plan.py) ----------------

def dit_activation_bytes(cfg: DiTConfig, batch: int, tokens: int, dtype_bytes: int) -> int:
    """Peak of the tensors one DiT forward keeps alive at once: the fp32 residual stream and its fp32 islands
    (norms, gates: ~22 bytes per token and channel) and the run-dtype attention and FFN tensors, plus the
    embedded context. Measured live bytes of the reference DiT are 0.67-0.8 of this (small preset, fp32 and
    bf16); a GPU allocator's fragmentation takes some of the rest."""
    d, f, c = cfg.dim, cfg.ffn_dim, cfg.text_len + cfg.clip_tokens
    return batch * (tokens * (22 * d + dtype_bytes * (2 * d + 3 * f // 2)) + 16 * c * d)


@lru_cache(maxsize=None)
def vae_cache_bytes(cfg: VAEConfig, part: str, h: int, w: int, dtype_bytes: int) -> int:
    """The causal caches of the VAE's encoder ("enc", video h x w) or decoder ("dec", latent h x w), as
    models/vae.py's encoder_cache_shapes / decoder_cache_shapes give them."""
    import torch

    from flf2v.models.vae import WanVAE
    with torch.device("meta"):
        vae = WanVAE(cfg)
    shapes = vae.encoder_cache_shapes(1, h, w) if part == "enc" else vae.decoder_cache_shapes(1, h, w)
    return sum(math.prod(s) for s in shapes) * dtype_bytes


def vae_decode_bytes(cfg: VAEConfig, h: int, w: int, frames: int, dtype_bytes: int, tile: int | None = None) -> int:
    """Decode of an h x w latent: the caches held across chunks, a chunk step's new caches and activations (2.06x
    the caches, counted live on the 14B VAE at any size), and the fp32 video out. With `tile` (models/vae.py's
    decode_tiled) the caches and activations are one tile's, and the fp32 video is held twice (the blended sum
    and its normalized copy) beside the tile's own output and its weighted copy."""
    s = cfg.stride[1]
    th, tw = (min(tile, h), min(tile, w)) if tile else (h, w)
    video = 3 * frames * s * s * 4  # fp32 bytes per latent pixel of the output video
    own = int(3.1 * vae_cache_bytes(cfg, "dec", th, tw, dtype_bytes)) + video * th * tw
    return own + (video * (th * tw + 2 * h * w) if tile else 0)


def vae_encode_bytes(cfg: VAEConfig, height: int, width: int, frames: int, dtype_bytes: int) -> int:
    """Encode of a video of height x width: the caches held, a chunk step's new ones and activations (2.47x the
    caches, counted live on the 14B VAE), and the condition video in fp32 and the run dtype."""
    return int(3.5 * vae_cache_bytes(cfg, "enc", height, width, dtype_bytes)) + 3 * frames * height * width * (
        4 + dtype_bytes)
