"""The Python API: a request resolves every default as the official code does, latents go in and come out,
and a CFG layout the engines lack is said, not silently swapped."""
import re
import warnings

import pytest
import torch
from conftest import rel_err
from helpers import StubBackend
from PIL import Image

from flf2v.models.config import get_preset
from flf2v.runtime.media import InputError
from flf2v.runtime.pipeline import Pipeline

KW = dict(size="64*64", frame_num=5, sample_steps=2, progress=False)


def test_a_thumbnail_frame_is_warned_of(pipe):
    with pytest.warns(UserWarning, match=r"the first frame \(8x8\) is upscaled 8x to 64x64"):
        pipe.generate("a red ball", Image.new("RGB", (8, 8)), Image.new("RGB", (64, 64)), seed=5,
                      output="latent", **{**KW, "sample_steps": 1})


def test_latents_in_and_out_reproduce_the_video(pipe, frames):
    video = pipe.generate("a red ball", *frames, seed=5, **KW)
    latent = pipe.generate("a red ball", *frames, seed=5, output="latent", **KW)
    assert latent.shape == (1, 16, 2, 8, 8)
    decoded = pipe.backend.vae_decode(latent)[0]
    assert rel_err(decoded, video)[0] == 0.0
    noise = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    again = pipe.generate("a red ball", *frames, seed=123, latents=noise, **KW)  # the seed's noise, given
    assert rel_err(again, video)[0] == 0.0
    assert pipe.last_request.seed is None and pipe.seed is None  # 123 drew nothing: recording it misleads
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


def test_latents_that_are_not_finite_tensors_are_refused_before_the_loop(pipe, frames):
    """NaN noise ran the encoders and the loop, then blamed the dtype and the checkpoint; a NumPy array was an
    AttributeError."""
    import numpy as np
    with pytest.raises(InputError, match=r"^latents must be a torch tensor of shape \(1, 16, 2, 8, 8\), got ndarray"):
        pipe.generate("x", *frames, latents=np.zeros((1, 16, 2, 8, 8), np.float32), **KW)
    with pytest.raises(InputError, match=r"^latents hold NaN or Inf; pass finite noise"):
        pipe.generate("x", *frames, latents=torch.full((1, 16, 2, 8, 8), float("nan")), **KW)


@pytest.mark.parametrize("kw, said", [(dict(dtype=torch.float16), r"^dtype torch.float16: use torch.float32 "),
                                      (dict(dtype="bf16"), r"^dtype 'bf16': use torch.float32 "),
                                      # in the API's terms (was "--device gpu", "use --device cpu")
                                      (dict(device="gpu"), r"^device='gpu' is not a device; use cuda, cuda:N or cpu"),
                                      (dict(device=""), r"^device='' is empty"),  # ran on the default device
                                      (dict(device="cuda"), r"^device='cuda': no CUDA GPU is usable here .*; "
                                                            r'use device="cpu"$')])
def test_from_checkpoint_checks_dtype_and_device_before_any_weight_loads(tiny_ckpt, monkeypatch, kw, said):
    """Raw torch errors (a TypeError in .to(), "Torch not compiled with CUDA") came after weights loaded."""
    if kw.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is usable here")

    def loads(*a, **k):
        raise AssertionError("weights loaded before the arguments were checked")
    monkeypatch.setattr("flf2v.runtime.torch_backend.TorchBackend.__init__", loads)
    with pytest.raises(InputError, match=said):
        Pipeline.from_checkpoint(tiny_ckpt, **kw)


@pytest.mark.parametrize("where", ["missing", "empty", "checkpoint", "root", "damaged"])
def test_from_engines_on_a_folder_without_engines_names_the_fix(tiny_ckpt, tmp_path, where):
    """A checkpoint folder, or a root of engine folders, was told to build into itself (`--out` it)."""
    from flf2v.export.manifest import EngineError
    folder = {"missing": tmp_path / "nope", "empty": tmp_path, "checkpoint": tiny_ckpt, "root": tmp_path,
              "damaged": tmp_path}[where]
    if where == "damaged":  # was "holds engine folders ... give one of them, e.g. <itself>"
        (tmp_path / "manifest.json").write_text('{"trunc')
    if where == "root":
        (tmp_path / "cpu" / "a").mkdir(parents=True)
        (tmp_path / "cpu" / "a" / "manifest.json").write_text("{}")
    f = re.escape(str(folder))
    said = {"missing": rf"{f}: no such folder; build one: run `flf2v-build --ckpt_dir CKPT --out {f}`",
            "empty": rf"{f}: not an engine folder \(no readable manifest.json\); build one: run `flf2v-build "
                     rf"--ckpt_dir CKPT --out {f}`",
            "checkpoint": rf"{f} is a checkpoint folder, not an engine folder; give the folder flf2v-build wrote "
                          rf"\(its --out\), or use Pipeline.from_checkpoint for the PyTorch reference",
            "root": rf"{f} holds engine folders, one per shape; give one of them, e.g. {f}/cpu/a",
            "damaged": rf"{f}: its manifest.json is damaged or incomplete \(no backend or checkpoint\); rebuild "
                       rf"it: run `flf2v-build --ckpt_dir CKPT --out {f}`"}[where]
    with pytest.raises(EngineError, match=rf"^{said}$"):
        Pipeline.from_engines(folder)


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


@pytest.mark.parametrize("options, says", [
    ({"seed": 3.5}, "seed must be an integer, got 3.5 (float)"), ({"seed": True}, "seed must be an integer"),
    ({"seed": "3"}, "seed must be an integer, got '3' (str)"), ({"frame_num": "5"}, "frame_num must be an integer"),
    ({"guide_scale": "5"}, "guide_scale must be a number"), ({"negative_prompt": 5}, "negative_prompt must be a "),
    ({"prompt": b"x"}, "prompt must be a string"), ({"sample_timesteps": "1000,500"}, "got the string '1000,500'"),
])
def test_api_arguments_of_the_wrong_type_are_named(options, says):
    """Were TypeErrors from deep inside, or false messages ("--frame_num 5 is not of the form 4n+1")."""
    import numpy as np
    pipe = Pipeline(StubBackend(), None, get_preset("tiny"))
    image = Image.new("RGB", (64, 64))
    with pytest.raises(InputError, match=re.escape(says)):
        pipe.request(options.pop("prompt", "x"), image, image, **options)
    req = pipe.request("x", image, image, seed=np.int64(3), frame_num=np.int64(5), sample_steps=np.int64(2))
    assert (req.seed, req.frame_num, req.sample_steps) == (3, 5, 2) and type(req.seed) is int


def test_seeds_are_distinct_in_32_bits_and_a_larger_one_is_said():
    """torch's CPU generator (the noise's) seeds from the low 32 bits: seeds 0 and 2^32 gave one video without a
    word, and random seeds drawn from 0..2^63-1 recorded a seed of which only part counted."""
    pipe = Pipeline(StubBackend(), None, get_preset("tiny"))
    image = Image.new("RGB", (64, 64))
    noise = [torch.randn(64, generator=torch.Generator().manual_seed(s)) for s in (3, 2**32 + 3, 4)]
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])  # what the warning says
    with pytest.warns(UserWarning, match=rf"--base_seed {2**32 + 3}: .* the video of seed 3; seeds 0\.\.4294967295"):
        assert pipe.request("x", image, image, seed=2**32 + 3).seed == 2**32 + 3  # recorded as given
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pipe.request("x", image, image, seed=2**32 - 1).seed == 2**32 - 1
        drawn = [pipe.request("x", image, image).seed for _ in range(64)]
    assert all(0 <= s < 2**32 for s in drawn) and len(set(drawn)) > 60, drawn


def test_cfg_layout_the_engines_lack_is_said():
    pipe = Pipeline(StubBackend(cfg_batches=(1,)), None, get_preset("tiny"))
    image = Image.new("RGB", (64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pipe.request("x", image, image).cfg_batch == 1  # nothing asked: the layout there is
    with pytest.warns(UserWarning, match="only the batch-1 DiT"):
        assert pipe.request("x", image, image, cfg_batch=2).cfg_batch == 1
    for bad in (0, 3):  # was run as the one layout there, with a warning naming a batch of 3
        with pytest.raises(InputError, match=f"cfg_batch {bad} must be 1"):
            pipe.request("x", image, image, cfg_batch=bad)
    assert pipe.last_request is None and pipe.seed is None  # no run yet (was an AttributeError)
    with pytest.raises(InputError, match="^the first frame: a 400x20 frame is too elongated"):  # which one
        pipe.request("x", Image.new("RGB", (400, 20)), image)


@pytest.mark.parametrize("name, says", [("guidance_scale", "did you mean guide_scale=?"),  # diffusers' name
                                        ("sample_guide_scale", "did you mean guide_scale=?"),  # the CLI's
                                        ("frame_nums", "did you mean frame_num=?"),
                                        ("colour", "the options are size, frame_num, ")])
def test_an_unknown_option_names_the_one_meant(name, says):
    """Was "make_request() got an unexpected keyword argument", an internal function, and no hint."""
    image = Image.new("RGB", (64, 64))
    with pytest.raises(TypeError, match=rf"^generate\(\) got an unknown option '{name}'; {re.escape(says)}"):
        Pipeline(StubBackend(), None, get_preset("tiny")).request("x", image, image, **{name: 3})


def test_option_values_torch_gives_are_read():
    image = Image.new("RGB", (64, 64))
    pipe = Pipeline(StubBackend(), None, get_preset("tiny"))
    req = pipe.request("x", image, image, sample_timesteps=torch.tensor([1000, 500]))  # was "not integers"
    assert req.sample_timesteps == (1000, 500)
    with pytest.raises(InputError, match=r"^sample_timesteps must be a list .* got the number 1000$"):
        pipe.request("x", image, image, sample_timesteps=torch.tensor(1000))
    with pytest.raises(TypeError, match=r"^request\(\) takes no 'progress': it is an option of generate\(\) alone"):
        pipe.request("x", image, image, progress=False)
    with pytest.raises(InputError, match=r"^cache_calibration 123 must be the path of a flf2v-calibrate-cache file"):
        pipe.request("x", image, image, cache="magcache", cache_calibration=123)  # was pathlib's TypeError


@pytest.mark.parametrize("kw, error, says", [
    (dict(attention="flash"), InputError, "attention='flash': use one of 'sdpa', 'triton', 'sage'"),
    (dict(offload=True), TypeError, "from_checkpoint() got an unknown option 'offload'; did you mean offload_model=?"),
    (dict(loras=5), None, 'loras=5: give "PATH[:SCALE]" or (path, scale)'),  # was "'int' object is not iterable"
])
def test_from_checkpoint_options_are_checked_before_any_weight_loads(tiny_ckpt, monkeypatch, kw, error, says):
    from flf2v.models.lora import LoRAError

    def loads(*a, **k):
        raise AssertionError("weights loaded before the arguments were checked")
    monkeypatch.setattr("flf2v.runtime.torch_backend.TorchBackend.__init__", loads)
    with pytest.raises(error or LoRAError, match="^" + re.escape(says)):
        Pipeline.from_checkpoint(tiny_ckpt, **kw)


def test_from_checkpoint_passes_on_every_torch_backend_option():
    import inspect

    from flf2v.runtime.pipeline import TORCH_OPTIONS
    from flf2v.runtime.torch_backend import TorchBackend
    own = ("self", "ckpt_dir", "preset", "dtype", "device", "loras")
    assert set(TORCH_OPTIONS) == set(inspect.signature(TorchBackend.__init__).parameters) - set(own)


def test_from_engines_checks_the_device(tiny_engines):
    with pytest.raises(InputError, match=r"^device='gpu' is not a device; use cuda, cuda:N or cpu"):
        Pipeline.from_engines(tiny_engines, device="gpu")  # was torch's RuntimeError listing 20 device types


def test_a_warning_points_at_the_callers_line():
    pipe = Pipeline(StubBackend(cfg_batches=(2,)), None, get_preset("tiny"))
    image = Image.new("RGB", (64, 64))
    with pytest.warns(UserWarning, match="guide scale 1") as said, pytest.raises(Exception):  # noqa: B017
        pipe.generate("x", image, image, guide_scale=1.0, progress=False)  # the stub runs no network
    assert [w.filename for w in said if "guide scale 1" in str(w.message)] == [__file__]  # was pipeline.py


def test_loras_given_as_any_iterable_are_read(tiny_ckpt, tmp_path):
    """A generator or a set of LoRAs was read before loras=5 was refused; it still is."""
    from safetensors.torch import save_file

    from flf2v.models import checkpoint as ck
    from flf2v.models.lora import load_loras
    cfg = ck.read_dit_config(tiny_ckpt)
    path = tmp_path / "l.safetensors"
    save_file({"blocks.0.ffn.0.lora_A.weight": torch.zeros(2, cfg.dim),
               "blocks.0.ffn.0.lora_B.weight": torch.zeros(cfg.ffn_dim, 2)}, str(path))
    for given in ([f"{path}:0.5"], (f"{path}:0.5" for _ in range(1)), {f"{path}:0.5"}):  # a generator, a set
        assert [s for _, s in load_loras(given, tiny_ckpt)] == [0.5]


def test_calls_from_two_threads_each_get_their_own_video(pipe, frames):
    """Two threads' runs on one Pipeline shared its kept denoising loop and mixed each other's latents (max abs
    difference up to 2 from their own runs, no error)."""
    import threading
    kw = {**KW, "sample_steps": 3, "output": "latent"}
    alone = {s: pipe.generate("a red ball", *frames, seed=s, **kw) for s in (1, 2)}
    got, start = {}, threading.Barrier(2)

    def one(seed):
        start.wait()
        got[seed] = pipe.generate("a red ball", *frames, seed=seed, **kw)
    threads = [threading.Thread(target=one, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in (1, 2):
        err = rel_err(got[s], alone[s])
        assert err[0] == 0.0, f"seed {s} in a thread vs alone: max abs {err[0]:.3g}, relative {err[1]:.3g}"


@pytest.mark.parametrize("prompt", ["", "  \n"])
def test_an_empty_prompt_runs_as_the_official_code_runs_it(pipe, frames, prompt):
    """The official code encodes an empty prompt (its tokenizer gives </s> alone, mask length 1); it was refused."""
    with pytest.warns(UserWarning, match="the prompt is empty"):
        z = pipe.generate(prompt, *frames, seed=5, output="latent", **{**KW, "sample_steps": 1})
    assert z.shape == (1, 16, 2, 8, 8) and torch.isfinite(z).all()
    ids, mask = pipe.tokenizer([prompt])
    eos = pipe.tokenizer.tokenizer.eos_token_id
    assert int(mask.sum()) == 1 and int(ids[0, 0]) == eos, (ids[0, :4], mask.sum(), eos)


def test_the_dit_is_given_the_official_mask_before_the_condition_latents(pipe, frames, monkeypatch):
    """The official `y = torch.concat([msk, y])`: the channel order of y was checked by nothing but the
    parity of whole runs with a y built the same way."""
    from flf2v.runtime.pipeline import condition_mask
    given, denoise = [], pipe.backend.denoise
    monkeypatch.setattr(pipe.backend, "denoise", lambda x, t, c, clip, y, *a, **k: (
        given.append(y.clone()), denoise(x, t, c, clip, y, *a, **k))[1])
    fresh = Pipeline(pipe.backend, pipe.tokenizer, pipe.preset)  # its own loops: they call the spy
    fresh.generate("a red ball", *frames, seed=5, output="latent", **{**KW, "sample_steps": 1})
    y = given[0][0]
    assert y.shape[0] == 4 + 16 and torch.equal(y[:4], condition_mask(5, 8, 8, True)), y[:4, :, 0, 0]
    assert not torch.equal(y[4:], y[4:].round().clamp(0, 1)), "the latents are not a second mask"


def test_a_kept_loop_runs_the_guide_scale_asked_and_seed_0_is_seed_0(pipe, frames):
    """The kept denoising loop is keyed by the run's settings: one kept from guide 5 must not run guide 3. Seed 0
    is a seed (the official generate.py draws a random one for negative seeds only)."""
    kw = {**KW, "sample_steps": 2, "output": "latent", "seed": 0}
    fresh = Pipeline(pipe.backend, pipe.tokenizer, pipe.preset)
    pipe.generate("a red ball", *frames, guide_scale=5.0, **kw)
    again = pipe.generate("a red ball", *frames, guide_scale=3.0, **kw)
    assert pipe.last_request.seed == 0
    err = rel_err(again, fresh.generate("a red ball", *frames, guide_scale=3.0, **kw))
    assert err[0] == 0.0, f"guide 3 after guide 5 vs a new pipeline: max abs {err[0]:.3g}, relative {err[1]:.3g}"
