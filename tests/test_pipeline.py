"""The reference FLF2V pipeline on the tiny checkpoint, end to end, and its preprocessing rules."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import StubBackend
from PIL import Image

from flf2v.models.config import PRESETS, get_preset
from flf2v.runtime import pipeline as pl
from flf2v.runtime import request as rq
from flf2v.runtime.media import InputError, load_image, read_video, save_video
from flf2v.runtime.scheduler import make_sampler

# The official default negative prompts, copied from github.com/Wan-Video/Wan2.1 (commit 9737cba):
# wan/configs/shared_config.py: wan_shared_cfg.sample_neg_prompt
OFFICIAL_SHARED_NEG = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                       "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
                       "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
# wan/configs/wan_i2v_14B.py: i2v_14B.sample_neg_prompt = "镜头晃动，" + i2v_14B.sample_neg_prompt
OFFICIAL_I2V_NEG = "镜头晃动，" + OFFICIAL_SHARED_NEG
# wan/configs/__init__.py: flf2v_14B = copy.deepcopy(i2v_14B);
#                          flf2v_14B.sample_neg_prompt = "镜头切换，" + flf2v_14B.sample_neg_prompt
OFFICIAL_FLF2V_NEG = "镜头切换，" + OFFICIAL_I2V_NEG


def test_latent_grid_matches_the_spec():
    # spec: 16:9 at 1280*720 -> 720x1280, latent 90x160 (75,600 tokens over 21 latent frames)
    assert rq.latent_grid((720, 1280), 1280 * 720, 8, 2) == (90, 160)
    assert rq.latent_grid((1280, 720), 1280 * 720, 8, 2) == (160, 90)
    lat_h, lat_w = rq.latent_grid((720, 1280), 1280 * 720, 8, 2)
    assert 21 * lat_h * lat_w // 4 == 75600


def _official_mask_81(lat_h, lat_w):
    # the official first_last_frame2video.py statement, hard-coded to 81 frames
    msk = torch.ones(1, 81, lat_h, lat_w)
    msk[:, 1:-1] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)[0]


def test_mask_equals_official_at_81_and_generalises():
    assert torch.equal(pl.condition_mask(81, 3, 5, True), _official_mask_81(3, 5))
    m = pl.condition_mask(9, 2, 2, True)  # 9 frames -> 3 latent frames of 4 pixel frames each
    assert m.shape == (4, 3, 2, 2)
    assert torch.equal(m[:, 0], torch.ones(4, 2, 2))
    assert torch.equal(m[:, 1], torch.zeros(4, 2, 2))
    assert torch.equal(m[:, 2, 0, 0], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    i2v = pl.condition_mask(9, 2, 2, False)
    assert i2v[:, 0].min() == 1 and i2v[:, 1:].max() == 0


@pytest.mark.parametrize("frame_num,near", [(0, "5 or more"), (4, "5 or more"), (8, "5 or 9"), (80, "77 or 81"),
                                            (-3, "5 or more"), (6.0, "5 or more"),
                                            (10**6, "4093 or fewer")])
def test_bad_frame_num(frame_num, near):
    with pytest.raises(InputError, match=rf"^--frame_num {frame_num} is not of the form 4n\+1 with n >= 1; use {near} "
                                         rf"\(tiny's default: 9\)$"):
        rq.check_frame_num(frame_num, get_preset("tiny"))


def test_frame_num_limit_is_the_models_rope_length():
    tiny = get_preset("tiny")  # 1024 latent frames of RoPE: 4 * 1023 + 1 video frames
    assert rq.check_frame_num(4093, tiny) == 4093
    with pytest.raises(InputError, match=r"^--frame_num 4097 is over the model's 4093 frame limit$"):
        rq.check_frame_num(4097, tiny)


def test_size_must_be_supported():
    with pytest.raises(InputError, match="not supported by flf2v-14B"):
        rq.parse_size("1920*1080", get_preset("flf2v-14B"))
    assert rq.parse_size("1280*720", get_preset("flf2v-14B")) == (1280, 720)


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return pl.Pipeline.from_checkpoint(tiny_ckpt)


def test_round_trip_to_mp4(pipe, demo_frames, tmp_path):
    first, last = (load_image(p) for p in demo_frames)
    video = pipe.generate("a red ball rolls", first, last, size="64*64", frame_num=9, sample_steps=3, seed=7,
                          progress=False)
    assert video.shape == (3, 9, 64, 64) and torch.isfinite(video).all()
    assert video.min() >= -1 and video.max() <= 1
    # deterministic for a seed
    again = pipe.generate("a red ball rolls", first, last, size="64*64", frame_num=9, sample_steps=3, seed=7,
                          progress=False)
    assert torch.equal(video, again)
    out = save_video(video, tmp_path / "v.mp4")
    frames = read_video(out)
    assert frames.shape == (9, 64, 64, 3)
    assert set(pipe.times.seconds) >= {"text_encoder", "image_encoder", "vae_encode", "denoise", "vae_decode"}


def test_flf2v_needs_last_frame(pipe, demo_frames):
    with pytest.raises(InputError, match="last frame"):
        pipe.generate("x", load_image(demo_frames[0]), None, progress=False)


# ---- default negative prompt ---------------------------------------------------------------------

def test_default_negative_prompt_is_the_official_one_per_task():
    assert OFFICIAL_FLF2V_NEG.startswith("镜头切换，镜头晃动，色调艳丽，") and OFFICIAL_FLF2V_NEG.endswith("倒着走")
    for name, p in PRESETS.items():  # tiny and small presets carry their model type's prompt
        want = OFFICIAL_FLF2V_NEG if p.dit.model_type == "flf2v" else OFFICIAL_I2V_NEG
        assert p.sample_neg_prompt == want, name
    assert get_preset("flf2v-14B").sample_neg_prompt == OFFICIAL_FLF2V_NEG
    assert get_preset("i2v-14B").sample_neg_prompt == OFFICIAL_I2V_NEG


class _Stop(Exception):
    pass


def _prompts_given_to_t5(preset_name, demo_frames, **kw):
    """The [prompt, negative prompt] the pipeline tokenizes (the run stops there)."""
    seen = []

    def tokenizer(texts):
        seen.extend(texts)
        raise _Stop

    preset = get_preset(preset_name)
    pipe = pl.Pipeline(StubBackend(), tokenizer, preset)
    first, last = (load_image(p) for p in demo_frames)
    with pytest.raises(_Stop):
        pipe.generate("a prompt", first, last if preset.dit.model_type == "flf2v" else None, progress=False, **kw)
    return seen


@pytest.mark.parametrize("preset,want", [("tiny", OFFICIAL_FLF2V_NEG), ("tiny-i2v", OFFICIAL_I2V_NEG),
                                         ("flf2v-14B", OFFICIAL_FLF2V_NEG), ("i2v-14B", OFFICIAL_I2V_NEG)])
def test_pipeline_uses_the_task_default_negative_prompt(preset, want, demo_frames):
    assert _prompts_given_to_t5(preset, demo_frames) == ["a prompt", want]
    assert _prompts_given_to_t5(preset, demo_frames, negative_prompt="blurry") == ["a prompt", "blurry"]


# ---- the last frame is resized (values, not shapes) ----------------------------------------------

def _bicubic(im: Image.Image, h: int, w: int) -> torch.Tensor:
    """The official first-frame preprocessing, written out: to [-1, 1], torch bicubic (align_corners=False)."""
    a = torch.tensor(np.array(im.convert("RGB")), dtype=torch.float64).permute(2, 0, 1) / 255 * 2 - 1
    return F.interpolate(a[None], size=(h, w), mode="bicubic", align_corners=False)[0].float()


def _official_crop(last: Image.Image, first: Image.Image) -> Image.Image:
    """What wan/first_last_frame2video.py does to a last frame of another size: scale by the larger ratio,
    then TF.center_crop with (w, h) passed as (h, w) (areas outside the image are zero-padded)."""
    r = max(first.size[0] / last.size[0], first.size[1] / last.size[1])
    size = [round(last.size[0] * r), round(last.size[1] * r)]  # [w, h] ...
    ch, cw = size  # ... read by center_crop as [h, w]
    left, top = int(round((last.size[0] - cw) / 2)), int(round((last.size[1] - ch) / 2))
    return last.crop((left, top, left + cw, top + ch))


def test_last_frame_of_another_size_is_resized(pipe, demo_frames, monkeypatch):
    first, last = (load_image(p) for p in demo_frames)
    last = last.resize((200, 90))  # another size and aspect ratio than the 128x128 first frame
    seen = []
    real = pipe.backend.vae_encode
    monkeypatch.setattr(pipe.backend, "vae_encode", lambda video: seen.append(video.clone()) or real(video))
    video = pipe.generate("x", first, last, size="64*64", frame_num=5, sample_steps=1, seed=1, progress=False)
    assert video.shape == (3, 5, 64, 64)
    (cond,) = seen
    assert cond.shape == (1, 3, 5, 64, 64)
    err_first = (cond[0, :, 0] - _bicubic(first, 64, 64)).abs().max().item()
    err_last = (cond[0, :, -1] - _bicubic(last, 64, 64)).abs().max().item()
    assert err_first < 1e-5 and err_last < 1e-5, (err_first, err_last)  # fp32 vs float64 resize: ~1e-7
    assert cond[0, :, 1:-1].abs().max() == 0
    # the check can tell the resize from the official crop: that one gives another picture
    assert (_bicubic(_official_crop(last, first), 64, 64) - cond[0, :, -1]).abs().max() > 0.5


# ---- every sampler, step count and official shift through the tiny DiT -----------------------------

@pytest.fixture(scope="module")
def denoise_inputs(pipe, demo_frames):
    """What generate() hands its denoising loop for the tiny checkpoint (real T5, CLIP and VAE outputs)."""
    seen = {}
    real = pipe.denoise

    def spy(sampler, x, context, clip_fea, y, guide, cfg_batch, progress, *rest):
        seen.update(x=x, context=context, clip_fea=clip_fea, y=y, guide=guide)
        return real(sampler, x, context, clip_fea, y, guide, cfg_batch, progress, *rest)

    pipe.denoise = spy
    try:
        first, last = (load_image(p) for p in demo_frames)
        pipe.generate("a red ball rolls", first, last, size="64*64", frame_num=5, sample_steps=1, seed=3,
                      progress=False)
    finally:
        del pipe.denoise
    return seen


# shifts: 16 (flf2v-14B), 5 (i2v-14B), 3 (i2v-14B at 480p): the official generate.py defaults
@pytest.mark.parametrize("shift", [16.0, 5.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 50])
@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_every_sampler_runs_the_tiny_dit(pipe, denoise_inputs, monkeypatch, solver, steps, shift):
    sampler = make_sampler(solver, steps, shift)
    given = []
    real = pipe.backend.denoise
    monkeypatch.setattr(pipe.backend, "denoise", lambda x, t, *a: given.append(t.clone()) or real(x, t, *a))
    d = denoise_inputs
    out = pipe.denoise(sampler, d["x"], d["context"], d["clip_fea"], d["y"], d["guide"], 2, False)
    assert out.shape == d["x"].shape and torch.isfinite(out).all()
    assert torch.equal(torch.stack(given)[:, 0], sampler.timesteps)  # every step reached the DiT
    if solver == "dpm++":
        assert given[0].tolist() == [1000, 1000]  # sigma 1: the top of the DiT's time table


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_generate_with_each_solver(pipe, demo_frames, solver):
    first, last = (load_image(p) for p in demo_frames)
    video = pipe.generate("x", first, last, size="64*64", frame_num=5, sample_solver=solver, sample_steps=2,
                          seed=5, progress=False)
    assert video.shape == (3, 5, 64, 64) and torch.isfinite(video).all()


def test_stages_hold_only_their_networks(tiny_ckpt, frames):
    """The release order of the torch backend as CUDA runs it (offload_model, its CUDA default), seen on the
    CPU: T5 and CLIP are gone before the first denoising step and stay gone through decode; the DiT is placed
    for the loop once per run (the graph token a captured graph is checked against moves with it)."""
    pipe = pl.Pipeline.from_checkpoint(tiny_ckpt, offload_model=True)
    b, seen = pipe.backend, {}
    denoise, decode = b.denoise, b.vae_decode

    def spy(stage, f):
        def call(*a, **k):
            seen.setdefault(stage, (b._t5 is None, b._clip is None))
            return f(*a, **k)
        return call
    b.denoise, b.vae_decode = spy("denoise", denoise), spy("vae_decode", decode)
    t0 = b.graph_token(2)
    pipe.generate("a red ball", *frames, size="64*64", frame_num=5, sample_steps=2, progress=False)
    assert seen == {"denoise": (True, True), "vae_decode": (True, True)}, seen
    assert b.graph_token(2) == t0 + 1
    pipe.generate("a red ball", *frames, size="64*64", frame_num=5, sample_steps=2, progress=False)
    assert b.graph_token(2) == t0 + 2  # a kept loop's graph would be recaptured, not replayed on moved weights


def test_graphs_of_a_released_dit_are_dropped_before_decode():
    """After the loop, a kept loop whose captured graph reads a DiT the backend released or moved (graph token
    changed or gone) drops the graph (its private memory pool); one whose DiT stayed keeps it for the next run."""
    from flf2v.runtime.denoise import DenoiseLoop

    class Backend:  # the DiT of batch 2 stayed loaded (token 7), batch 1's was released (None)
        def graph_token(self, cfg_batch):
            return 7 if cfg_batch == 2 else None

    def loop(token):
        lp = DenoiseLoop.__new__(DenoiseLoop)
        lp.graph, lp.graph_cached, lp.token = object(), None, token
        return lp
    pipe = pl.Pipeline(Backend(), None, get_preset("tiny"))
    kept, moved, released = loop(7), loop(6), loop(3)
    pipe.loops.update({((1,), 2, True, 5.0, "a", False): kept, ((2,), 2, True, 5.0, "a", False): moved,
                       ((1,), 1, True, 5.0, "a", False): released})
    pipe._release_stale_graphs()
    assert kept.graph is not None and moved.graph is None and released.graph is None
