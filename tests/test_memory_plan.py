"""Memory plans (runtime/memory_plan.py): the planner's sizes against meta-device builds, its choices per card,
streamed / offloaded runs against the resident one, the device residency per stage, tiled VAE decode."""
import dataclasses
import functools
import re
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flf2v.models import sizes
from flf2v.models.config import get_preset
from flf2v.models.vae import WanVAE, tile_starts
from flf2v.runtime import memory_plan as M

GiB = 2**30
FULL = get_preset("flf2v-14B")


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors ops create that are alive at once (storages counted once, freed when their
    last tensor is): the activations of what runs under it."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _drop(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                # meta tensors have no storage address: each counts (views too, an overcount the bound allows)
                key = ("meta", id(t)) if t.is_meta else t.untyped_storage().data_ptr()
                if key not in self.live:
                    self.live[key] = [t.untyped_storage().nbytes(), 0]
                    self.now += self.live[key][0]
                    self.peak = max(self.peak, self.now)
                self.live[key][1] += 1
                weakref.finalize(t, self._drop, key)
        return out


def meta_bytes(module: torch.nn.Module, dtype_bytes: int) -> int:
    return sum(t.numel() for t in module.state_dict().values()) * dtype_bytes


# ---- sizes: closed forms vs meta-device builds -----------------------------------------------------------

@pytest.mark.parametrize("name", ["flf2v-14B", "i2v-14B", "tiny", "small"])
def test_weight_bytes_equal_the_meta_built_networks(tmp_path, name):
    p = get_preset(name)
    from flf2v.models.clip import CLIPVisual
    from flf2v.models.dit import WanDiT
    from flf2v.models.t5 import UMT5Encoder
    with torch.device("meta"):
        dit, t5, clip, vae = WanDiT(p.dit), UMT5Encoder(p.t5), CLIPVisual(p.clip), WanVAE(p.vae)
    got = sizes.weight_bytes(p, 2)
    block = meta_bytes(dit.blocks[0], 2)
    want = {"dit_block": block, "dit_outer": meta_bytes(dit, 2) - p.dit.num_layers * block,
            "t5": meta_bytes(t5, 2), "clip": meta_bytes(clip, 2), "vae": meta_bytes(vae, 2)}
    assert got == want, {k: (got[k], want[k]) for k in want}
    from flf2v.models.quant import quantize_dit
    with torch.device("meta"):
        one = WanDiT(dataclasses.replace(p.dit, num_layers=1))
    quantize_dit(one)
    # FP8Linear: float8 weights, fp32 scales; the rest of the block in the run dtype (2 bytes here)
    fp8 = sum(t.numel() * (1 if t.dtype == torch.float8_e4m3fn else 4 if k.endswith("weight_scale") else 2)
              for k, t in one.blocks[0].state_dict().items())
    assert sizes.dit_block_bytes(p.dit, 2, "fp8") == fp8


def test_dit_activation_estimate_bounds_the_live_bytes_of_a_forward():
    from flf2v.models.dit import WanDiT
    c = get_preset("small").dit
    torch.manual_seed(0)
    for dtype, b, (f, h, w) in ((torch.float32, 1, (5, 32, 32)), (torch.bfloat16, 2, (3, 32, 48))):
        dit = WanDiT(c).to(dtype).eval()
        args = (torch.randn(b, 16, f, h, w), torch.full((b,), 500), torch.randn(b, c.text_len, c.text_dim),
                torch.randn(b, c.clip_tokens, c.clip_dim), torch.randn(b, 20, f, h, w))
        with torch.no_grad(), LiveBytes() as live:
            dit(*args)
        est = sizes.dit_activation_bytes(c, b, f * h * w // 4, dtype.itemsize)
        assert live.peak <= est <= 1.6 * live.peak, (dtype, b, live.peak, est)


def test_vae_estimates_bound_the_live_bytes_of_the_14b_vae_on_meta():
    with torch.device("meta"):
        vae = WanVAE(FULL.vae).to(torch.bfloat16)
    vae = vae.to("meta")
    h, w = 30, 40  # latent pixels; the counts scale with the area
    caches = vae.zero_caches(vae.decoder_cache_shapes(1, h, w), "meta")
    with torch.no_grad(), LiveBytes() as live:
        vae.decode_chunk(torch.empty(1, 16, 1, h, w, device="meta"), caches, False)
    held = sum(c.numel() * 2 for c in caches)
    est = sizes.vae_decode_bytes(FULL.vae, h, w, 0, 2)  # 0 frames: without the video out
    assert held + live.peak <= est <= 1.1 * (held + live.peak), (held, live.peak, est)
    caches = vae.zero_caches(vae.encoder_cache_shapes(1, 8 * h, 8 * w), "meta")
    with torch.no_grad(), LiveBytes() as live:
        vae.encode_chunk(torch.empty(1, 3, 4, 8 * h, 8 * w, device="meta"), caches, False)
    held = sum(c.numel() * 2 for c in caches)
    est = sizes.vae_encode_bytes(FULL.vae, 8 * h, 8 * w, 0, 2)
    assert held + live.peak <= est <= 1.1 * (held + live.peak), (held, live.peak, est)


def test_tiled_decode_adds_at_most_the_estimated_whole_video_terms():
    """decode_tiled holds one tile's caches and activations plus the whole fp32 video (the blended sum and its
    normalized copy): what tiling adds to one tile's own decode is bounded by the estimate's video terms, and the
    tiled peak is far below the whole-frame one. Real tensors of the tiny VAE (the 14B structure; meta views
    would count the whole video per tile); the 14B caches-to-activations factor is checked on meta above."""
    vae = WanVAE(get_preset("tiny").vae)
    z = torch.randn(1, 16, 2, 24, 40)  # 5 frames

    def peak(x, tile=None):
        with torch.no_grad(), LiveBytes() as live:
            vae.decode(x, tile=tile, overlap=4)
        return live.peak
    whole = peak(z)
    for tile in (16,):  # 2 x 3 tiles; 16 does not divide 40
        alone, tiled = peak(z[..., :tile, :tile].clone()), peak(z, tile)
        est = sizes.vae_decode_bytes(vae.cfg, 24, 40, 5, 4, tile) - sizes.vae_decode_bytes(vae.cfg, tile, tile, 5, 4)
        assert 0 < tiled - alone <= est <= 3 * (tiled - alone), (tile, tiled, alone, est)
        assert tiled < whole * 0.4, (tile, tiled, whole)


# ---- the planner's choices ---------------------------------------------------------------------------------

def meta_weights(preset, dtype_bytes: int) -> dict[str, int]:
    """Each network's bytes from its meta-device build through the checkpoint loader's own builder."""
    with torch.device("meta"):
        from flf2v.models.clip import CLIPVisual
        from flf2v.models.dit import WanDiT
        from flf2v.models.t5 import UMT5Encoder
        dit = WanDiT(preset.dit)
        nets = {"t5": UMT5Encoder(preset.t5), "clip": CLIPVisual(preset.clip), "vae": WanVAE(preset.vae)}
    out = {k: meta_bytes(m, dtype_bytes) for k, m in nets.items()}
    out["block"] = meta_bytes(dit.blocks[0], dtype_bytes)
    out["dit"] = meta_bytes(dit, dtype_bytes)
    return out


# (card GiB, height, width) -> the plan chosen for the FLF2V-14B in bf16, 81 frames, a 64 GiB host: the DiT
# out of the way of T5 (10.6 GiB) before streaming, streaming before the CFG pair's batch ... the most blocks
EXPECTED = {(80, 720, 1280): "resident", (80, 480, 832): "resident", (48, 720, 1280): "resident + cfg_batch 1",
            (48, 480, 832): "resident", (32, 720, 1280): "offload + blocks:21 + cfg_batch 1",
            (32, 480, 832): "offload + blocks:31 + cfg_batch 1", (24, 720, 1280): "offload + blocks:11 + cfg_batch 1",
            (24, 480, 832): "offload + blocks:20 + cfg_batch 1"}


@pytest.mark.parametrize("card,height,width", list(EXPECTED))
def test_plan_per_card_is_the_fastest_that_fits_by_the_meta_sizes(card, height, width):
    video = M.Video(FULL, height, width, 81)
    plan = M.choose(video, card * GiB, host_bytes=64 * GiB)
    assert plan.name == EXPECTED[(card, height, width)], plan.describe()
    m, budget = meta_weights(FULL, 2), card * GiB - M.RESERVE
    n = FULL.dit.num_layers
    dit_loop = m["dit"] if plan.blocks is None else m["dit"] - (n - plan.blocks - 2) * m["block"]
    act = sizes.dit_activation_bytes(FULL.dit, plan.cfg_batch, video.tokens, 2)
    assert dit_loop + m["vae"] + act <= budget, "the loop's weights (meta sizes) and activations fit"
    if plan.blocks is not None:  # one more resident block would not fit: N is the largest
        assert dit_loop + m["block"] + m["vae"] + act > budget
    if not plan.t5_cpu:
        assert m["t5"] + m["vae"] + (0 if plan.offload_model else m["dit"]) <= budget
    assert plan.peak <= budget
    # on the host: the whole DiT when offloaded (outside the loop), else the streamed blocks; T5 on the CPU
    host = m["dit"] if plan.offload_model else (n - plan.blocks) * m["block"] if plan.blocks is not None else 0
    assert plan.host == host + (m["t5"] if plan.t5_cpu else 0), (plan.host / GiB, host / GiB, plan.name)


def test_plan_that_cannot_fit_names_the_smallest_card():
    video = M.Video(FULL, 720, 1280, 81)
    with pytest.raises(M.InputError, match=r"needs a 1\d\.\d GiB card .*blocks:0 \+ cfg_batch 1.*add --quant fp8"):
        M.choose(video, 12 * GiB, host_bytes=64 * GiB)
    with pytest.raises(M.InputError, match=r"needs a 1\d\.\d GiB card") as e:  # fp8 already: not offered again
        M.choose(dataclasses.replace(video, quant="fp8"), 12 * GiB, host_bytes=64 * GiB)
    assert "--quant" not in str(e.value), e.value
    with pytest.raises(M.InputError, match="no memory plan with the DiT resident fits 24 GiB"):
        M.choose(video, 24 * GiB, lambda p: not p.offload_model and p.blocks is None, 64 * GiB,
                 " with the DiT resident")
    table, chosen = M.table(video, 24 * GiB, 64 * GiB)
    assert "* chosen: offload + blocks:11 + cfg_batch 1" in table and chosen == "offload + blocks:11 + cfg_batch 1"
    for v in (video, M.Video(get_preset("tiny"), 64, 64, 9, 4)):  # the card named is one that fits (rounded up)
        with pytest.raises(M.InputError, match="no more than the 1 GiB reserved"):  # "lower --size" cannot help
            M.choose(v, GiB // 2, host_bytes=64 * GiB)
        with pytest.raises(M.InputError) as e:
            M.choose(v, M.RESERVE + 2**20, host_bytes=64 * GiB)
        card = float(re.search(r"needs a ([\d.]+) GiB card", str(e.value)).group(1))
        assert M.choose(v, int(card * GiB), host_bytes=64 * GiB).peak <= card * GiB - M.RESERVE, e.value


# ---- runs under plans: the same video, and the device residency the plan counts ----------------------------

@functools.lru_cache(maxsize=None)
def _run(ckpt, plan, cfg_batch=2):
    from flf2v.runtime.media import load_image
    from flf2v.runtime.pipeline import Pipeline
    from flf2v.runtime.torch_backend import TorchBackend
    from flf2v.models import checkpoint as ck
    preset = ck.preset_for(ckpt)
    backend = TorchBackend(ckpt, preset, plan=plan)
    seen, now = {}, [None]
    for stage, method in (("text_encoder", "encode_text"), ("image_encoder", "encode_image"),
                          ("vae_encode", "vae_encode"), ("denoise", "denoise"), ("vae_decode", "vae_decode")):
        def stage_of(*a, _f=getattr(backend, method), _s=stage, **kw):
            now[0] = _s
            try:
                return _f(*a, **kw)
            finally:
                now[0] = None
        setattr(backend, method, stage_of)

    def probe(module, args, out):  # while a network runs: what the backend holds on the device then
        if now[0] is not None and type(module).__name__ in ("UMT5Encoder", "CLIPVisual", "Block", "ResidualBlock"):
            seen[now[0]] = max(seen.get(now[0], 0), sum(backend.device_bytes().values()))
    hook = torch.nn.modules.module.register_module_forward_hook(probe)
    pipe = Pipeline(backend, ck.load_tokenizer(ckpt, preset), preset)
    first, last = (load_image(p) for p in _frames(ckpt))
    video = pipe.generate("a cat", first, last, seed=3, progress=False, sample_steps=2,
                          cfg_batch=plan.cfg_batch if plan is not None else cfg_batch)
    hook.remove()
    return video, seen, backend


def _frames(ckpt):
    from flf2v.models.make_tiny import write_demo_frames
    return write_demo_frames(ckpt.parent / "frames")


PLANS = [M.Plan(offload_model=True, t5_cpu=True, blocks=0), M.Plan(blocks=1, cfg_batch=1),
         M.Plan(offload_model=True)]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_planned_run_equals_the_resident_run_and_keeps_the_plans_residency(tiny_ckpt, plan):
    ref, _, _ = _run(tiny_ckpt, None, plan.cfg_batch)  # the CFG layouts differ by float rounding (~1e-5)
    video, seen, backend = _run(tiny_ckpt, plan)
    err = (video - ref).abs().max().item()
    assert err == 0.0, f"{plan.name}: max abs {err} vs the resident run (fp32: the same math)"
    if plan.blocks is not None:
        calls = 2 * (2 if plan.cfg_batch == 1 else 1)  # 2 steps, the CFG pair in one or two DiT calls
        assert backend.streamed.copies == calls * len(backend.streamed.host), "each streamed block once per call"
    want = M.stage_weights(M.Video(backend.preset, 64, 64, 9, dtype_bytes=4), plan)
    assert seen == want, f"{plan.name}: device bytes per stage {seen}, the plan counts {want}"


def test_streaming_engines_take_the_plans_their_folder_runs(monkeypatch):
    """STREAM=1 engines (TensorRT, aoti): T5 never on the CPU (the engines run it on the GPU), only the folder's DiT
    layouts (no cfg_batch 1 without dit_b1), and the engine's weight budget is the plan's resident DiT bytes
    by the meta build (all of the DiT less the streamed blocks)."""
    from flf2v.runtime.choose import memory_plan
    from flf2v.runtime.media import InputError
    w = meta_weights(FULL, 2)
    monkeypatch.setattr(M, "host_memory", lambda: 64 * M.GiB)

    def plan_for(gib, layouts, **flags):
        args = SimpleNamespace(**{**dict(offload=None, offload_blocks=None, t5_cpu=False, offload_model=None,
                                         plan=False, dtype=None, quant="none"), "gpu_memory": gib, **flags})
        engines = {"precision": "bf16", "weight_streaming": True,
                   "engines": {"t5": {}, **{f"dit{k}_b{b}": {} for b in layouts for k in ("", "_cached")}}}
        return memory_plan(args, FULL, 720, 1280, 81, torch.device("cpu"), engines=engines)
    for gib, layouts in ((32, (2,)), (24, (1, 2))):
        plan = plan_for(gib, layouts)
        budget = plan.dit_budget
        assert plan.offload_model and not plan.t5_cpu and plan.cfg_batch in layouts and plan.blocks, plan.name
        assert budget == w["dit"] - (FULL.dit.num_layers - plan.blocks) * w["block"], (budget, plan.name)
    assert plan.name == EXPECTED[(24, 720, 1280)], plan.name  # the torch backend's plan, with dit_b1 built
    with pytest.raises(InputError, match="--cfg_batch 1"):  # the batch-2 DiT's activations alone need more
        plan_for(24, (2,))
    with pytest.raises(InputError, match="--t5_cpu"):
        plan_for(24, (1, 2), t5_cpu=True)
    monkeypatch.setattr(M, "host_memory", lambda: 16 * M.GiB)  # the streamed blocks do not fit its RAM
    with pytest.raises(InputError, match="host memory, over 90% of 16.0 GiB"):
        plan_for(24, (1, 2))


# ---- tiled VAE decode --------------------------------------------------------------------------------------

def test_tile_starts_cover_the_frame_with_the_overlap():
    assert tile_starts(13, 32, 8) == [0]
    for size, tile, overlap in ((22, 8, 2), (13, 8, 4), (90, 64, 8), (160, 48, 8)):
        starts = tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == size
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:])), starts


def _vae_and_latent(seed=0, h=13, w=22):
    torch.manual_seed(seed)
    return WanVAE(get_preset("tiny").vae).eval(), torch.randn(1, 16, 2, h, w)


def test_tiled_decode_is_the_untiled_one_when_one_tile_covers_the_frame():
    vae, z = _vae_and_latent()
    with torch.no_grad():
        assert torch.equal(vae.decode(z, tile=32), vae.decode(z))


def test_tiled_decode_seams_of_a_local_decoder_are_only_near_tile_edges():
    """With the mid-block attention silenced the decoder is local (a receptive field of R latent pixels), so a
    tiled decode equals the untiled one except within R of a tile's inner edge: checks placement and blending."""
    vae, z = _vae_and_latent(1, h=10, w=60)
    with torch.no_grad():
        vae.decoder.middle[1].proj.weight.zero_()
        vae.decoder.middle[1].proj.bias.zero_()
        ref = vae.decode(z)
        out = vae.decode(z, tile=36, overlap=12)  # columns [0, 36) and [24, 60)
    err = (out - ref).abs().amax(dim=(0, 1, 2, 3))  # per pixel column
    r = 20 * 8  # receptive field bound in pixels (20 latent pixels)
    assert err[: 36 * 8 - r].max() < 1e-5 and err[24 * 8 + r:].max() < 1e-5, (err[: 36 * 8 - r].max(),
                                                                               err[24 * 8 + r:].max())
    assert err.max() > 1e-3, "the seam band differs (else this test could not see misplaced tiles)"


@pytest.mark.parametrize("axis, size, tile, overlap", [(-1, 60, 36, 12), (-2, 60, 36, 12), (-1, 50, 36, 12)])
def test_tiled_decode_cross_fades_linearly_over_each_overlap(monkeypatch, axis, size, tile, overlap):
    """Tiles of constants (0 for the first along `axis`, 1 for the second) decode to the textbook linear
    cross-fade over the pixels the two share, 0 and 1 outside: weights on a tile's low side missing, or an
    overlap in latent rather than pixel units, passed the seam tests above (their PSNR and far-field checks)."""
    from flf2v.models import vae as V
    vae = WanVAE(get_preset("tiny").vae)
    s = vae.cfg.stride[1]
    shape = [1, 16, 2, 8, 8]
    shape[axis] = size
    z = torch.zeros(shape)
    z.select(1, 0).copy_(torch.arange(size, dtype=torch.float32).view([-1] + [1] * (-1 - axis)))

    def constant_tile(chunk, part, caches):  # 1 where the tile does not start at the frame's edge
        out = [part.shape[0], 3, 1 + vae.cfg.stride[0] * (part.shape[2] - 1), part.shape[3] * s, part.shape[4] * s]
        return torch.full(out, float(part[0, 0].amin() > 0))
    monkeypatch.setattr(V, "decode_chunks", constant_tile)
    line = V.decode_tiled(vae, z, tile, overlap).movedim(axis, -1)[0, 0, 0, 0]  # along `axis`
    second = size - tile  # the last tile ends at the edge
    lo, hi = second * s, tile * s  # pixels both tiles cover
    x = torch.arange(size * s, dtype=torch.float64)
    want = ((x + 0.5 - lo) / (hi - lo)).clamp(0, 1)
    assert torch.allclose(line.double(), want, atol=1e-6), (axis, size, (line.double() - want).abs().max().item())


def test_tiled_decode_of_tiles_not_dividing_the_frame_stays_close():
    """Random weights: the mid-block attention mixes each tile globally, so the seams are large; the bound
    (measured 21-25 dB, stated 20 dB PSNR vs untiled) guards the blending of uneven tiles, not image quality."""
    vae, z = _vae_and_latent()  # a 13 x 22 latent
    with torch.no_grad():
        ref = vae.decode(z)
        for tile, overlap in ((8, 2), (8, 4), (6, 3)):
            out = vae.decode(z, tile=tile, overlap=overlap)
            psnr = 10 * torch.log10(4 / ((out - ref) ** 2).mean()).item()
            assert torch.isfinite(out).all() and psnr >= 20, f"tile {tile} overlap {overlap}: PSNR {psnr:.1f} dB"


# ---- flf2v-run -------------------------------------------------------------------------------------------

def test_cli_plan_table_and_refusals_before_anything_loads(tiny_ckpt, demo_frames, tmp_path, capsys, monkeypatch):
    from helpers import _args, run
    from flf2v.models import checkpoint as ck
    monkeypatch.setattr(ck, "load_dit", lambda *a, **k: pytest.fail("weights loaded"))
    out = tmp_path / "v.mp4"
    assert run(_args(tiny_ckpt, demo_frames, out, "--plan", "--gpu_memory", "24")) == 0
    said = capsys.readouterr().out
    assert "* chosen: resident" in said and "on 24 GiB" in said, said
    # tiny's MB were rows of 0.0: 3 significant digits show them
    row = next(line for line in said.splitlines() if line.startswith("* ") and line.endswith("  resident"))
    assert all(float(v) > 0 for v in row.split()[1:-2]), row  # the stages (host: 0, all resident)
    assert run(_args(tiny_ckpt, demo_frames, out, "--plan", "--device", "cpu")) == 0
    said = capsys.readouterr().out
    assert "no GPU here: planned for a card of this host's memory" in said, said  # not an invented card
    # the planning flags narrow the table's choice as they narrow the run's; none fitting is said with the reason
    # none fitting: exit 2 as the run would be refused (was 0: a script asking "will it fit?" heard yes)
    for flags, says, rc in ((["--t5_cpu"], "* chosen: resident + t5_cpu\n", 0),
                            (["--offload_model", "true"], "* chosen: offload\n", 0),
                            (["--offload", "blocks:1"], "* chosen: resident + blocks:1\n", 0),
                            # under the reserve no plan can help: said so, not "lower --size"
                            (["--gpu_memory", "0.5"], "\n0.5 GiB is no more than the 1 GiB reserved for CUDA's context",
                             2),
                            (["--gpu_memory", "0.001"], "on 0.001 GiB (", 2)):  # was "on 0 GiB", then 0.000999999
        assert run(_args(tiny_ckpt, demo_frames, out, "--plan", "--gpu_memory", "24", *flags)) == rc, flags
        said = capsys.readouterr().out
        assert says in said, (flags, said)
    for flags, msg in ((["--gpu_memory", "0.5"], "0.5 GiB is no more than the 1 GiB reserved"),
                       (["--plan", "--offload", "blocks:2"], "tiny has 2 blocks"),
                       (["--plan", "--lora", str(tmp_path / "none.safetensors")], "none.safetensors"),
                       (["--plan", "--attention", "sage", "--backend", "ort"], "--attention sage applies to --backend torch"),
                       (["--offload", "blocks:2"], "tiny has 2 blocks"),
                       (["--offload", "layers:1"], "use blocks or blocks:N"),
                       (["--gpu_memory", "-3"], "must be a positive number of GiB"),
                       (["--offload", "blocks", "--backend", "ort"], "ort engines load whole"),
                       (["--t5_cpu", "--backend", "trt"], "engines run T5 on the GPU")):
        assert run(_args(tiny_ckpt, demo_frames, out, *flags)) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (flags, err)
    assert not out.exists()


def test_the_plan_line_shows_a_small_model_s_bytes():
    """A tiny model's plan line read "text_encoder 0.0, ..., denoise 0.0; host 0.0 GiB": a plan of nothing."""
    plan = M.choose(M.Video(get_preset("tiny"), 64, 64, 9, 4), 24 * GiB, host_bytes=64 * GiB)
    line = plan.describe()
    figures = [float(v) for v in re.findall(r" (\d[\d.e-]*)(?:,|;)", line)]
    assert len(figures) == len(plan.stages) and all(v > 0 for v in figures), line
    for v, (stage, b) in zip(figures, plan.stages):  # 3 significant digits of the plan's own bytes
        assert abs(v - b / GiB) <= 0.005 * b / GiB, (stage, v, b, line)


def test_cli_plan_of_a_size_alone_needs_no_prompt_or_frames(tiny_ckpt, capsys):
    """`--plan --ckpt_dir CKPT` asked for a prompt, then for both frames, to print plans that need neither."""
    from helpers import run
    for size, grid in ((None, "64x64"), ("96*64", "96x64")):
        args = ["--ckpt_dir", str(tiny_ckpt), "--plan", "--gpu_memory", "24", "--backend", "torch"] + (
            ["--size", size] if size else [])  # auto: engines/ of this machine may hold engines that serve it
        assert run(args) == 0, size
        said = capsys.readouterr().out
        assert f"memory plans for tiny at {grid}, 9 frames" in said and "* chosen: resident" in said, said


def test_cli_plan_is_printed_by_rank_0_only(tiny_ckpt, demo_frames, tmp_path, capsys, monkeypatch):
    """Under torchrun every process printed the whole table."""
    from helpers import _args, run
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert run(_args(tiny_ckpt, demo_frames, tmp_path / "v.mp4", "--plan", "--gpu_memory", "24")) == 0
        assert ("* chosen: resident" in capsys.readouterr().out) == printed, rank


def test_cli_streamed_run_writes_the_resident_video_and_records_its_plan(tiny_ckpt, demo_frames, tmp_path,
                                                                          monkeypatch):
    import json

    from helpers import _args, run, saved_videos
    saved = saved_videos(monkeypatch)
    ref, out, metrics = tmp_path / "ref.mp4", tmp_path / "s.mp4", tmp_path / "m.json"
    assert run(_args(tiny_ckpt, demo_frames, ref)) == 0
    assert run(_args(tiny_ckpt, demo_frames, out, "--offload", "blocks:1", "--t5_cpu", "--metrics", str(metrics))) == 0
    plan = json.loads(metrics.read_text())["memory_plan"]
    assert (plan["blocks"], plan["t5_cpu"]) == (1, True), plan
    a, b = saved[str(ref)], saved[str(out)]
    assert torch.equal(a, b), f"max abs {(a - b).abs().max().item():.3g}"


def test_weight_streaming_build_needs_tensorrt(tiny_ckpt, tmp_path, capsys):
    """flf2v-build --weight_streaming where the build is not TensorRT's: one line, exit 2, no folder."""
    from flf2v.export.build import main
    out = tmp_path / "engines"
    assert main(["--ckpt_dir", str(tiny_ckpt), "--out", str(out), "--weight_streaming", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "STREAM=1" in err[0] and "this build is ort" in err[0], err
    assert not out.exists()


def test_cli_plan_is_made_for_the_engines_the_run_takes(tiny_ckpt, tiny_engines, demo_frames, tmp_path, capsys):
    """`--plan` planned for the torch backend whatever engines the run would take: it chose "resident" and
    "resident + blocks:1" for ORT engines, which load whole, and which the run refuses to stream."""
    from helpers import _args, run
    out, on = tmp_path / "v.mp4", ["--engines", str(tiny_engines), "--backend", "auto", "--frame_num", "9"]
    assert run(_args(tiny_ckpt, demo_frames, out, "--plan", "--gpu_memory", "24", *on)) == 0
    said = capsys.readouterr().out
    assert f"for the ort engines in {tiny_engines} (they load whole" in said and "* chosen: offload\n" in said, said
    for flags in (["--offload", "blocks:1"], ["--t5_cpu"]):  # the run's own refusal, before it loads
        assert run(_args(tiny_ckpt, demo_frames, out, "--plan", "--gpu_memory", "24", *on, *flags)) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "but ort engines run this job" in err[0], (flags, err)
        assert run(_args(tiny_ckpt, demo_frames, out, *on, *flags)) == 2, flags
        assert "but ort engines run this job" in capsys.readouterr().err, flags
    # engines release the encoders whatever --offload_model says (the run ignores it): a min() of no plans was a
    # traceback; flags that leave no plan are said in one line
    assert run(_args(tiny_ckpt, demo_frames, out, "--plan", "--gpu_memory", "24", *on, "--offload_model", "false")) == 0
    assert "* chosen: offload\n" in capsys.readouterr().out
    with pytest.raises(M.InputError, match="no memory plan is left with --t5_cpu: the flags exclude each other"):
        M.choose(M.Video(get_preset("tiny"), 64, 64, 9), 24 * GiB, allowed=lambda p: False, what=" with --t5_cpu")
    assert run(_args(tiny_ckpt, demo_frames, out, "--plan", "--gpu_memory", "24", "--backend", "torch")) == 0
    said = capsys.readouterr().out
    assert "for the " not in said and "* chosen: resident\n" in said, said
    assert not out.exists()
