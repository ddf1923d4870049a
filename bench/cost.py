"""Cost model: FLOPs and minimum bytes per stage of one video, and the floor time on H100 / H200.

FLOPs count multiply-adds as 2 and only matrix products (linear layers, attention scores and
attention-times-values, convolutions); norms, activations, RoPE and the sampler are left out (well
under 1% of the DiT). Per network:
- DiT, per forward of one sample with L video tokens, C = text_len + clip_tokens context tokens, width d,
  FFN width f, per layer: q/k/v/o 8Ld^2, self-attention scores + AV 4L^2d, cross-attention
  4Ld^2 (q, o) + 4Cd^2 (text and image k, v) + 4LCd, FFN 4Ldf; plus patch embedding, text/image/time
  embeddings and head. The k/v projections of the context are counted in every forward, as computed.
- umT5: every one of the text_len positions of both prompts (padding is computed too): per layer
  8Ld*d_attn + 4L^2 d_attn + 6Ldf (gated FFN).
- CLIP: num_layers - 1 blocks (penultimate features) on each conditioning frame.
- VAE: convolutions and the mid-block attention counted by torch's FlopCounterMode on the reference VAE
  built on the meta device (one first chunk + one steady chunk, times the number of chunks).
Minimum bytes: weights read once per call (bf16: 2 B/param; fp8: 1 B/param) plus every input read and
every output written once in bf16; a perfect kernel schedule keeps everything else on chip.
Floor time of a stage = max(FLOPs / peak dense FLOP/s, bytes / memory bandwidth).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from flf2v.models.config import CLIPConfig, DiTConfig, Preset, T5Config, VAEConfig
# parameter counts are the model's (the memory planner uses them too); re-exported for the bench
from flf2v.models.sizes import clip_params, dit_block_linear_params, dit_params, t5_params  # noqa: F401


@dataclass(frozen=True)
class GPU:
    name: str
    bf16: float  # dense FLOP/s
    fp8: float
    bandwidth: float  # bytes/s
    memory: float  # bytes


# SXM parts, dense (no sparsity) tensor-core rates from NVIDIA's data sheets.
GPUS = {
    "H100": GPU("H100 SXM", 989e12, 1979e12, 3.35e12, 80e9),
    "H200": GPU("H200 SXM", 989e12, 1979e12, 4.8e12, 141e9),
}
PRECISIONS = {"bf16": 2, "fp8": 1}  # bytes per weight
ACT_BYTES = 2  # activations moved at graph edges, bf16


@dataclass(frozen=True)
class Cost:
    flops: float
    params: int  # weights read per call
    io_elements: int  # inputs read + outputs written
    calls: int = 1

    def bytes(self, precision: str = "bf16") -> float:
        return self.calls * (self.params * PRECISIONS[precision] + self.io_elements * ACT_BYTES)

    @property
    def total_flops(self) -> float:
        return self.calls * self.flops

    def floor(self, gpu: GPU, precision: str = "bf16") -> float:
        return max(self.total_flops / getattr(gpu, precision), self.bytes(precision) / gpu.bandwidth)


# ---- per network ------------------------------------------------------------------------------------

def dit_tokens(cfg: DiTConfig, latent: tuple[int, int, int]) -> int:
    t, h, w = latent
    pt, ph, pw = cfg.patch_size
    return (t // pt) * (h // ph) * (w // pw)


def dit_layer_flops(cfg: DiTConfig, tokens: int) -> dict[str, float]:
    L, d, f = tokens, cfg.dim, cfg.ffn_dim
    c = cfg.text_len + cfg.clip_tokens
    return {"qkvo": 8 * L * d * d, "self_attention": 4 * L * L * d,
            "cross_attention": 4 * L * d * d + 4 * c * d * d + 4 * L * c * d, "ffn": 4 * L * d * f}


def dit_outer_flops(cfg: DiTConfig, tokens: int) -> float:
    """Outside the blocks: patch embedding, text/image/time embeddings and head."""
    L, d, patch = tokens, cfg.dim, math.prod(cfg.patch_size)
    return (2 * L * cfg.in_dim * patch * d  # patch embedding
            + 2 * cfg.text_len * (cfg.text_dim * d + d * d)  # text embedding MLP
            + 2 * cfg.clip_tokens * (cfg.clip_dim ** 2 + cfg.clip_dim * d)  # image embedding MLP
            + 2 * (cfg.freq_dim * d + d * d + 6 * d * d)  # time embedding and projection
            + 2 * L * d * cfg.out_dim * patch)  # head


def dit_forward_flops(cfg: DiTConfig, latent: tuple[int, int, int]) -> float:
    """One forward of one sample (CFG doubles it)."""
    L = dit_tokens(cfg, latent)
    return cfg.num_layers * sum(dit_layer_flops(cfg, L).values()) + dit_outer_flops(cfg, L)


def dit_flops_split(cfg: DiTConfig, latent: tuple[int, int, int]) -> dict[str, float]:
    """One forward's FLOPs by the precision each part can run in: "linear", the blocks' linears (self q/k/v/o,
    cross q/o, text and image k/v, FFN: what --quant fp8 quantizes); "attention", the self- and cross-attention
    scores and AV products (what an 8-bit attention kernel runs); "other", the embeddings and head (kept in
    the run dtype). The three add up to dit_forward_flops."""
    L, n = dit_tokens(cfg, latent), cfg.num_layers
    layer, cross_products = dit_layer_flops(cfg, L), 4 * L * (cfg.text_len + cfg.clip_tokens) * cfg.dim
    return {"linear": n * (layer["qkvo"] + layer["cross_attention"] - cross_products + layer["ffn"]),
            "attention": n * (layer["self_attention"] + cross_products), "self_attention": n * layer["self_attention"],
            "other": dit_outer_flops(cfg, L)}


def dit_split_floor(cfg: DiTConfig, latent: tuple[int, int, int], gpu: GPU, linear: str = "bf16",
                    attention: str = "bf16", calls: int = 1) -> float:
    """Floor of `calls` DiT forwards with the blocks' linears at the `linear` rate (and their weights in its
    bytes) and the attention products at the `attention` rate ("fp8": the 8-bit tensor-core rate, FP8 or INT8
    alike); the embeddings and head stay bf16. With both "bf16" it is dit_cost(...).floor(gpu, "bf16")."""
    s = dit_flops_split(cfg, latent)
    seconds = calls * (s["linear"] / getattr(gpu, linear) + s["attention"] / getattr(gpu, attention)
                       + s["other"] / gpu.bf16)
    saved = calls * dit_block_linear_params(cfg) * (PRECISIONS["bf16"] - PRECISIONS[linear])
    return max(seconds, (dit_cost(cfg, latent, calls).bytes("bf16") - saved) / gpu.bandwidth)


def dit_cost(cfg: DiTConfig, latent: tuple[int, int, int], calls: int = 1) -> Cost:
    t, h, w = latent
    io = (cfg.in_dim + cfg.out_dim) * t * h * w + cfg.text_len * cfg.text_dim + cfg.clip_tokens * cfg.clip_dim
    return Cost(dit_forward_flops(cfg, latent), dit_params(cfg), io, calls)


def t5_cost(cfg: T5Config, prompts: int = 2) -> Cost:
    L, d, a = cfg.text_len, cfg.dim, cfg.dim_attn
    layer = 8 * L * d * a + 4 * L * L * a + 6 * L * d * cfg.ffn_dim
    # only the looked-up rows of the embedding table are read
    params = t5_params(cfg, with_embedding=False) + prompts * L * d
    return Cost(prompts * cfg.num_layers * layer, params, prompts * L * (2 + d))


def clip_cost(cfg: CLIPConfig, images: int) -> Cost:
    n, d, h = cfg.num_tokens, cfg.dim, cfg.dim * cfg.mlp_ratio
    layer = 8 * n * d * d + 4 * n * n * d + 4 * n * d * h
    patch = 2 * cfg.num_patches * 3 * cfg.patch_size ** 2 * d
    io = images * (3 * cfg.image_size ** 2 + n * d)
    return Cost(images * ((cfg.num_layers - 1) * layer + patch), clip_params(cfg), io)


@lru_cache(maxsize=None)
def _vae_chunk_flops(cfg: VAEConfig, part: str, height: int, width: int) -> tuple[float, float]:
    """(first chunk, steady chunk) FLOPs of encode ('enc', pixel size) or decode ('dec', latent size)."""
    from torch.utils.flop_counter import FlopCounterMode

    from flf2v.models.vae import WanVAE
    with torch.device("meta"):
        vae = WanVAE(cfg)
    vae = vae.to("meta")  # fixed tables are built real; the count needs everything on meta
    enc = part == "enc"
    caches = (vae.encoder_cache_shapes if enc else vae.decoder_cache_shapes)(1, height, width)
    out = []
    for first in (True, False):
        x = torch.empty(1, 3 if enc else cfg.z_dim, 1 if first or not enc else cfg.stride[0], height, width,
                        device="meta")
        with FlopCounterMode(display=False) as counter:
            (vae.encode_chunk if enc else vae.decode_chunk)(x, vae.zero_caches(caches, "meta"), first)
        out.append(float(counter.get_total_flops()))
    return out[0], out[1]


def vae_params(cfg: VAEConfig, part: str) -> int:
    from flf2v.models.vae import WanVAE
    with torch.device("meta"):
        vae = WanVAE(cfg)
    mods = (vae.encoder, vae.conv1) if part == "enc" else (vae.decoder, vae.conv2)
    return sum(p.numel() for m in mods for p in m.parameters())


def vae_cost(cfg: VAEConfig, part: str, frames: int, height: int, width: int) -> Cost:
    """part 'enc': a [3, frames, height, width] clip -> latent; 'dec': latent -> that clip."""
    st, ss = cfg.stride[0], cfg.stride[1]
    t_lat, h, w = (frames - 1) // st + 1, height // ss, width // ss
    first, steady = _vae_chunk_flops(cfg, part, *((height, width) if part == "enc" else (h, w)))
    io = 3 * frames * height * width + cfg.z_dim * t_lat * h * w
    return Cost(first + (t_lat - 1) * steady, vae_params(cfg, part), io)


# ---- one video -----------------------------------------------------------------------------------------

def video_costs(preset: Preset, width: int, height: int, frames: int, steps: int, cfg_batch: int = 2,
                dit: DiTConfig | None = None) -> dict[str, Cost]:
    """Stage -> Cost of one FLF2V / I2V video; `denoise_step` is one step (both CFG passes); `end_to_end` the
    other stages' FLOPs and bytes together."""
    dit = dit or preset.dit
    ss, st = preset.vae.stride[1], preset.vae.stride[0]
    latent = ((frames - 1) // st + 1, height // ss, width // ss)
    stages = {
        "text_encoder": t5_cost(preset.t5),
        "image_encoder": clip_cost(preset.clip, 2 if dit.model_type == "flf2v" else 1),
        "vae_encode": vae_cost(preset.vae, "enc", frames, height, width),
        "denoise_step": dit_cost(dit, latent, calls=cfg_batch),
        "denoise": dit_cost(dit, latent, calls=cfg_batch * steps),
        "vae_decode": vae_cost(preset.vae, "dec", frames, height, width),
    }
    parts = [c for k, c in stages.items() if k != "denoise_step"]
    stages["end_to_end"] = Cost(sum(c.total_flops for c in parts), sum(c.calls * c.params for c in parts),
                                sum(c.calls * c.io_elements for c in parts))
    return stages


def floors(costs: dict[str, Cost]) -> dict[str, dict[str, float]]:
    """Stage -> {"H100 bf16": s, "H100 fp8": s, "H200 bf16": s, "H200 fp8": s}; end_to_end = sum of stages."""
    out = {stage: {f"{g} {p}": c.floor(gpu, p) for g, gpu in GPUS.items() for p in PRECISIONS}
           for stage, c in costs.items() if stage != "end_to_end"}
    out["end_to_end"] = {k: sum(v[k] for s, v in out.items() if s != "denoise_step") for k in out["denoise"]}
    return out


def cost_table(preset: Preset, width: int, height: int, frames: int, steps: int, cfg_batch: int = 2) -> dict:
    """JSON-ready: per stage FLOPs, minimum bytes (bf16, fp8) and floors."""
    costs = video_costs(preset, width, height, frames, steps, cfg_batch)
    fl = floors(costs)
    return {stage: {"flops": c.total_flops, "min_bytes_bf16": c.bytes("bf16"), "min_bytes_fp8": c.bytes("fp8"),
                    "floor_s": fl[stage]} for stage, c in costs.items()}
