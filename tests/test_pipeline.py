"""The reference FLF2V pipeline on the tiny checkpoint, end to end, and its preprocessing rules."""
import json

import pytest
import torch

from flf2v.models.config import get_preset
from flf2v.runtime import pipeline as pl
from flf2v.runtime.media import InputError, load_image, read_video, save_video


def test_latent_grid_matches_the_spec():
    # spec: 16:9 at 1280*720 -> 720x1280, latent 90x160 (75,600 tokens over 21 latent frames)
    assert pl.latent_grid((720, 1280), 1280 * 720, 8, 2) == (90, 160)
    assert pl.latent_grid((1280, 720), 1280 * 720, 8, 2) == (160, 90)
    lat_h, lat_w = pl.latent_grid((720, 1280), 1280 * 720, 8, 2)
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


@pytest.mark.parametrize("frame_num", [0, 4, 8, 80, -3])
def test_bad_frame_num(frame_num):
    with pytest.raises(InputError, match="4n\\+1"):
        pl.check_frame_num(frame_num, 1024)


def test_size_must_be_supported():
    with pytest.raises(InputError, match="not supported by flf2v-14B"):
        pl.parse_size("1920*1080", get_preset("flf2v-14B"))
    assert pl.parse_size("1280*720", get_preset("flf2v-14B")) == (1280, 720)


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


def test_last_frame_of_another_size_is_resized(pipe, demo_frames):
    first, last = (load_image(p) for p in demo_frames)
    video = pipe.generate("x", first, last.resize((200, 90)), size="64*64", frame_num=5, sample_steps=1, seed=1,
                          progress=False)
    assert video.shape == (3, 5, 64, 64)


def test_flf2v_needs_last_frame(pipe, demo_frames):
    with pytest.raises(InputError, match="last frame"):
        pipe.generate("x", load_image(demo_frames[0]), None, progress=False)
