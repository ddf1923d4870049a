"""The Python API: a request resolves every default as the official code does, latents go in and come out,
and a CFG layout the engines lack is said, not silently swapped."""
import warnings

import pytest
import torch
from conftest import rel_err
from helpers import StubBackend
from PIL import Image

from flf2v.models.config import get_preset
from flf2v.runtime.pipeline import Pipeline

KW = dict(size="64*64", frame_num=5, sample_steps=2, progress=False)


def test_latents_in_and_out_reproduce_the_video(pipe, frames):
    video = pipe.generate("a red ball", *frames, seed=5, **KW)
    latent = pipe.generate("a red ball", *frames, seed=5, output="latent", **KW)
    assert latent.shape == (1, 16, 2, 8, 8)
    decoded = pipe.backend.vae_decode(latent)[0]
    assert rel_err(decoded, video)[0] == 0.0
    noise = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    again = pipe.generate("a red ball", *frames, seed=123, latents=noise, **KW)  # the seed's noise, given
    assert rel_err(again, video)[0] == 0.0
    other = pipe.generate("a red ball", *frames, seed=5, latents=noise * 0.5, **KW)
    assert rel_err(other, video)[0] > 1e-3


def test_frames_as_paths_images_and_arrays(pipe, demo_frames, frames):
    import numpy as np
    want = pipe.generate("a red ball", *frames, seed=5, output="latent", **KW)
    for given in ([str(p) for p in demo_frames], demo_frames, [np.asarray(f) for f in frames]):
        got = pipe.generate("a red ball", *given, seed=5, output="latent", **KW)
        assert torch.equal(got, want), type(given[0])


def test_wrong_latents_shape_is_refused(pipe, frames):
    from flf2v.runtime.media import InputError
    with pytest.raises(InputError, match=r"latents must have shape \(1, 16, 2, 8, 8\)"):
        pipe.generate("x", *frames, latents=torch.zeros(1, 16, 3, 8, 8), **KW)


def test_last_request_records_the_values_used(pipe, frames):
    pipe.generate("a red ball", *frames, seed=9, **KW)
    r = pipe.last_request
    p = get_preset("tiny")
    assert (r.height, r.width, r.frame_num, r.sample_steps, r.seed) == (64, 64, 5, 2, 9)
    assert (r.sample_shift, r.guide_scale, r.negative_prompt) == (p.sample_shift, p.sample_guide_scale,
                                                                   p.sample_neg_prompt)


@pytest.mark.parametrize("size,shift", [("832*480", 3.0), ("480*832", 3.0), ("1280*720", 5.0)])
def test_i2v_shift_follows_the_official_size_rule(size, shift):
    """generate.py: sample_shift 5 for I2V, 3 at 480p (and 16 for FLF2V at any size)."""
    w, h = (int(v) for v in size.split("*"))
    image = Image.new("RGB", (w, h))
    i2v = Pipeline(StubBackend(), None, get_preset("i2v-14B"))
    assert i2v.request("x", image, size=size).sample_shift == shift
    flf2v = Pipeline(StubBackend(), None, get_preset("flf2v-14B"))
    assert flf2v.request("x", image, image, size=size).sample_shift == 16.0


def test_cfg_layout_the_engines_lack_is_said():
    pipe = Pipeline(StubBackend(cfg_batches=(1,)), None, get_preset("tiny"))
    image = Image.new("RGB", (64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pipe.request("x", image, image).cfg_batch == 1  # nothing asked: the layout there is
    with pytest.warns(UserWarning, match="only the batch-1 DiT"):
        assert pipe.request("x", image, image, cfg_batch=2).cfg_batch == 1
