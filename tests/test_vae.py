"""Wan-VAE: parity with diffusers' AutoencoderKLWan, chunk-step API, meta build, bf16."""
from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from flf2v.models.config import VAEConfig, get_preset
from flf2v.models.vae import WanVAE

from _diffusers_vae import build_diffusers_vae

CFG = get_preset("tiny").vae
FRAMES, H, W = 9, 32, 48  # 3 encoder chunks / 3 latent frames: the first, the one after it, a steady one
T = 1 + (FRAMES - 1) // 4


def random_state_dict(model: WanVAE, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("gamma"):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("bias"):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5
    # keep decoded frames mostly inside [-1, 1] so the final clamp cannot hide errors
    sd["decoder.head.2.weight"] *= 0.3
    sd["decoder.head.2.bias"] *= 0.3
    return sd


def build(cfg: VAEConfig, sd: dict) -> WanVAE:
    with torch.device("meta"):
        model = WanVAE(cfg)
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def sd():
    with torch.device("meta"):
        model = WanVAE(CFG)
    return random_state_dict(model, seed=0)


@pytest.fixture(scope="module")
def vae(sd):
    return build(CFG, sd)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    video = torch.rand(1, 3, FRAMES, H, W, generator=g) * 2 - 1
    z = torch.randn(1, CFG.z_dim, T, H // 8, W // 8, generator=g)
    return video, z


def _latent_stats():
    return torch.tensor(CFG.mean).view(1, -1, 1, 1, 1), torch.tensor(CFG.std).view(1, -1, 1, 1, 1)


@torch.no_grad()
def test_encode_matches_diffusers(vae, sd, inputs):
    video, _ = inputs
    mean, std = _latent_stats()
    ref = (build_diffusers_vae(CFG, sd).encode(video).latent_dist.mean - mean) / std
    out = vae.encode(video)
    assert out.shape == ref.shape == (1, CFG.z_dim, T, H // 8, W // 8)
    abs_err, rel = rel_err(out, ref)
    assert rel < 1e-5, f"encode vs diffusers: max abs {abs_err:.3e}, max rel {rel:.3e}"


@torch.no_grad()
def test_decode_matches_diffusers(vae, sd, inputs):
    _, z = inputs
    mean, std = _latent_stats()
    ref = build_diffusers_vae(CFG, sd).decode(z * std + mean).sample
    assert (ref.abs() >= 1).float().mean() < 0.01, "test weights saturate the clamp"
    out = vae.decode(z)
    assert out.shape == ref.shape == (1, 3, FRAMES, H, W)
    abs_err, rel = rel_err(out, ref)
    assert rel < 1e-5, f"decode vs diffusers: max abs {abs_err:.3e}, max rel {rel:.3e}"


def _drive(step, chunks, caches, shapes):
    """Runs chunk steps by hand, checking the cache contract after each one."""
    outs = []
    for i, x in enumerate(chunks):
        before = [c.clone() for c in caches]
        out, new = step(x, caches, first=i == 0)
        assert [tuple(c.shape) for c in new] == shapes, f"cache shapes changed at chunk {i}"
        assert all(torch.equal(a, b) for a, b in zip(caches, before)), f"chunk {i} mutated its input caches"
        assert not any(n.data_ptr() == c.data_ptr() for n in new for c in caches), f"chunk {i} aliases a cache"
        outs.append(out)
        caches = new
    return torch.cat(outs, dim=2)


@torch.no_grad()
def test_chunk_steps_equal_whole_clip(vae, inputs):
    video, z = inputs
    video = torch.cat([video, video.flip(2)])  # B = 2
    z = torch.cat([z, -z])

    shapes = vae.encoder_cache_shapes(2, H, W)
    chunks = [video[:, :, :1]] + [video[:, :, 1 + 4 * i: 5 + 4 * i] for i in range(T - 1)]
    stepped = _drive(vae.encode_chunk, chunks, vae.zero_caches(shapes), shapes)
    whole = vae.encode(video)
    assert torch.equal(stepped, whole), f"encode chunk steps differ: max abs {rel_err(stepped, whole)[0]:.3e}"
    abs_err, rel = rel_err(whole[1:], vae.encode(video[1:]))
    assert rel < 1e-5, f"batch row 1 vs alone: max abs {abs_err:.3e}, max rel {rel:.3e}"

    shapes = vae.decoder_cache_shapes(2, H // 8, W // 8)
    stepped = _drive(vae.decode_chunk, list(z.split(1, dim=2)), vae.zero_caches(shapes), shapes)
    whole = vae.decode(z)
    assert torch.equal(stepped, whole), f"decode chunk steps differ: max abs {rel_err(stepped, whole)[0]:.3e}"
    abs_err, rel = rel_err(whole[1:], vae.decode(z[1:]))
    assert rel < 1e-5, f"batch row 1 vs alone: max abs {abs_err:.3e}, max rel {rel:.3e}"


def test_chunk_shape_errors(vae):
    caches = vae.zero_caches(vae.encoder_cache_shapes(1, H, W))
    with pytest.raises(ValueError, match="encoder chunk shape"):
        vae.encode_chunk(torch.zeros(1, 3, 4, H, W), caches, first=True)
    with pytest.raises(ValueError, match="caches have shapes"):
        vae.encode_chunk(torch.zeros(1, 3, 1, H, W), caches[:-1], first=True)
    with pytest.raises(ValueError, match="frame count 8"):
        vae.encode(torch.zeros(1, 3, 8, H, W))
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encoder_cache_shapes(1, 36, W)


def test_real_size_builds_on_meta():
    with torch.device("meta"):
        model = WanVAE(get_preset("flf2v-14B").vae)
    sd = model.state_dict()
    # Wan2.1_VAE.pth: 194 tensors, 126.9 M parameters (see the spec)
    assert len(sd) == 194, len(sd)
    assert round(sum(v.numel() for v in sd.values()) / 1e6, 1) == 126.9
    assert {k.split(".")[0] for k in sd} == {"encoder", "conv1", "conv2", "decoder"}
    assert model.mean.device.type == "cpu" and model.mean.dtype == torch.float32
    assert model.mean.flatten()[0].item() == pytest.approx(-0.7571)
    assert len(model.encoder_cache_shapes(1, 720, 1280)) == 24 and len(model.decoder_cache_shapes(1, 90, 160)) == 32


@torch.no_grad()
def test_bf16_close_to_fp32(vae, sd, inputs):
    video, z = inputs
    vae16 = build(CFG, {k: v.bfloat16() for k, v in sd.items()})
    lat16, lat32 = vae16.encode(video), vae.encode(video)
    frames16, frames32 = vae16.decode(z), vae.decode(z)
    assert lat16.dtype == frames16.dtype == torch.float32
    assert torch.isfinite(lat16).all() and torch.isfinite(frames16).all()
    # bf16 keeps 8 mantissa bits (rel. rounding 4e-3) and ~25 convs compound it: measured ~1e-2 here
    for name, a, b in (("encode", lat16, lat32), ("decode", frames16, frames32)):
        abs_err, rel = rel_err(a, b)
        assert rel < 5e-2, f"bf16 {name} vs fp32: max abs {abs_err:.3e}, max rel {rel:.3e}"
