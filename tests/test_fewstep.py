"""CFG-free runs (guide scale 1: one batch-1 DiT call per step, the prompt alone through T5) and the
few-step sampler of step-distilled models (--sample_timesteps), against hand-written references."""
import copy
import json
import warnings

import pytest
import torch
from conftest import rel_err
from PIL import Image
from helpers import StubBackend, _args, run

from flf2v.models.config import get_preset
from flf2v.runtime.denoise import DenoiseLoop
from flf2v.runtime.engine_backend import EngineBackend
from flf2v.runtime.media import InputError
from flf2v.runtime.pipeline import Pipeline
from flf2v.runtime.scheduler import make_sampler

KW = dict(size="64*64", frame_num=5, seed=11, progress=False)
LIST = [1000, 750, 500, 250]  # LightX2V configs/distill/wan21/wan_i2v_distill_*_4step_cfg.json


def spied(pipe, monkeypatch):
    """Records the batch and timestep of every DiT call and the rows the text encoder gets."""
    calls, texts = [], []
    b = pipe.backend
    pipe.loops.clear()  # a kept loop holds the denoiser it was built with
    real_dit, real_t5 = b.denoise, b.encode_text
    monkeypatch.setattr(b, "denoise", lambda x, t, *a: calls.append((x.shape[0], t.tolist())) or real_dit(x, t, *a))
    monkeypatch.setattr(b, "encode_text", lambda ids, mask: texts.append(ids.shape[0]) or real_t5(ids, mask))
    return calls, texts


# ---- guide scale 1: no uncond forward, no negative prompt ------------------------------------------

def test_guide_1_runs_the_dit_once_per_step(pipe, frames, monkeypatch):
    calls, texts = spied(pipe, monkeypatch)
    pipe.generate("a red ball", *frames, sample_steps=3, guide_scale=1, **KW)
    assert [n for n, _ in calls] == [1, 1, 1] and texts == [1]
    r = pipe.last_request
    assert (r.cfg, r.cfg_batch, r.negative_prompt) == (False, 1, None)
    assert r.to_json()["cfg"] == "off"


def test_guide_1_equals_the_batch_2_path(pipe, frames, monkeypatch):
    """One batch-1 call per step vs the batch-2 DiT on [x, x] with the cond context twice (cfg_batch=2 asks
    for it; engines holding only dit_b2 fall back to it, with one warning)."""
    ref = pipe.generate("a red ball", *frames, sample_steps=3, guide_scale=1, **KW)
    calls, _ = spied(pipe, monkeypatch)
    b2 = pipe.generate("a red ball", *frames, sample_steps=3, guide_scale=1, cfg_batch=2, **KW)
    assert [n for n, _ in calls] == [2, 2, 2] and pipe.last_request.cfg_batch == 2
    err, rel = rel_err(b2, ref)
    # measured max abs 3.6e-6 (fp32, CPU): batch-1 and batch-2 matmuls round differently
    print(f"guide 1, batch 1 vs batch 2 [x, x]: max abs {err:.2e}")
    assert err < 5e-5, f"batch 1 vs batch 2: max abs {err:.2e}, rel {rel:.2e}"

    monkeypatch.setattr(pipe.backend, "cfg_batches", (2,), raising=False)  # engines built --cfg_batch 2
    with pytest.warns(UserWarning, match=r"only the batch-2 DiT.*flf2v-build --cfg_batch 1\|both") as said:
        fallback = pipe.generate("a red ball", *frames, sample_steps=3, guide_scale=1, **KW)
        pipe.generate("a red ball", *frames, sample_steps=3, guide_scale=1, **KW)
    assert len([w for w in said if "batch-2 DiT" in str(w.message)]) == 1  # once per pipeline
    assert torch.equal(fallback, b2)


def test_request_without_cfg_records_it():
    image = Image.new("RGB", (64, 64))
    pipe = Pipeline(StubBackend(cfg_batches=(1, 2)), None, get_preset("tiny"))
    r = pipe.request("x", image, image, guide_scale=1.0)
    assert (r.cfg, r.cfg_batch) == (False, 1)
    assert {"cfg": "off", "cfg_batch": 1, "negative_prompt": None}.items() <= r.to_json().items()
    on = pipe.request("x", image, image).to_json()  # a plain run keeps the record's shape
    assert "cfg" not in on and "sample_timesteps" not in on and on["cfg_batch"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batch-1 engines serve a CFG-free run as they are
        assert Pipeline(StubBackend(cfg_batches=(1,)), None, get_preset("tiny")).request(
            "x", image, image, guide_scale=1.0).cfg_batch == 1


def test_engine_t5_takes_the_prompt_alone():
    """The T5 engine's static batch is 2: a batch of 1 fills both rows and keeps the first."""
    t5 = torch.nn.Embedding(10, 4)
    given = []

    def run_graph(graph, inputs):
        given.append([t.clone() for t in inputs])
        return [t5(inputs[0]) * inputs[1][..., None]]

    eb = EngineBackend.__new__(EngineBackend)  # the method under test needs the specs and _run only
    eb.specs, eb._run = {"t5": {"inputs": [{"name": "ids", "shape": [2, 3]}]}}, run_graph
    ids, mask = torch.tensor([[1, 2, 0], [3, 4, 5]]), torch.tensor([[1, 1, 0], [1, 1, 1]])
    both = eb.encode_text(ids, mask)
    one = eb.encode_text(ids[:1], mask[:1])
    assert one.shape == (1, 3, 4) and torch.equal(one, both[:1])
    assert given[1][0].tolist() == [[1, 2, 0], [1, 2, 0]] and given[1][1].tolist() == [[1, 1, 0], [1, 1, 0]]


# Measured (tiny checkpoint, seed 11, onnxruntime CPU, engines built --cfg_batch 2): ORT vs torch video max abs
# 4.8e-6 (3 UniPC steps) and 3.8e-6 (the 4-step list, shift 5); tolerance 1e-4 as the other engine tests.
def test_engines_with_only_the_batch_2_dit_run_without_cfg(pipe, tiny_dynamic_engines, frames):
    """The real fallback: the T5 engine (static batch 2) gets the prompt alone, dit_b2 runs [x, x]."""
    eng = Pipeline.from_engines(tiny_dynamic_engines)
    assert eng.backend.cfg_batches == (2,)
    said = []
    for extra in (dict(sample_steps=3), dict(sample_timesteps=LIST, sample_shift=5.0)):
        ref = pipe.generate("a red ball", *frames, guide_scale=1, **extra, **KW)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = eng.generate("a red ball", *frames, guide_scale=1, **extra, **KW)
        said += [str(m.message) for m in w]
        assert (eng.last_request.cfg, eng.last_request.cfg_batch) == (False, 2)
        err, rel = rel_err(out, ref)
        assert err < 1e-4, f"ORT (dit_b2 fallback) vs torch without CFG, {extra}: max abs {err:.2e}"
    assert len(said) == 1 and "flf2v-build --cfg_batch 1|both" in said[0]  # once per pipeline


# ---- the loop: CFG-free layouts and the few-step sampler, eager and exported --------------------------

@pytest.fixture(scope="module")
def setup(dit_setup):
    return dit_setup


def test_no_cfg_equals_cfg_at_guide_1(setup):
    """Skipping the uncond forward changes nothing at guide 1 but rounding: u + 1 * (c - u) = c."""
    dit, x, context, clip, y = setup
    sampler = make_sampler("unipc", 4, 16.0)
    with_cfg = DenoiseLoop(dit, sampler, x, context, clip, y, 1.0, 2).run()
    for b in (1, 2):
        without = DenoiseLoop(dit, sampler, x, context[:1], clip, y, 1.0, b, cfg=False).run()
        err, rel = rel_err(without, with_cfg)
        print(f"cfg off (batch {b}) vs cfg at guide 1: max abs {err:.2e}, rel {rel:.2e}")
        assert rel < 1e-5, f"cfg off, batch {b}, vs cfg at guide 1: max abs {err:.2e}, rel {rel:.2e}"


def distill_reference(dit, x, context, clip, y, timesteps, shift):
    """LightX2V's WanStepDistillScheduler written out from its facts (see /tmp/notes/fewstep_readme.md):
    sigma(t) = shift*s / (1 + (shift-1)*s) with s = t/1000; x0 = x - sigma v; x = x0 + sigma_next v except
    after the last step; no noise re-injected; guide 1 (cond only). The DiT gets the nearest integer t."""
    sig = [shift * (t / 1000) / (1 + (shift - 1) * (t / 1000)) for t in timesteps]
    fed = []
    for i, sigma in enumerate(sig):
        t = int(sigma * 1000 + 0.5)
        fed.append(t)
        v = dit(x, torch.tensor([t]), context[:1], clip, y)
        x = x - sigma * v
        if i + 1 < len(sig):
            x = x + v * sig[i + 1]
    return x, fed


@pytest.mark.parametrize("timesteps,shift,fed", [(LIST, 5.0, [1000, 938, 833, 625]),
                                                 (LIST, 16.0, [1000, 980, 941, 842]),
                                                 ([999, 500, 1], 1.0, [999, 500, 1])])
def test_few_step_sampler_equals_the_distill_update(setup, timesteps, shift, fed):
    dit, x, context, clip, y = setup
    sampler = make_sampler("distill", len(timesteps), shift, timesteps)
    assert sampler.timesteps.tolist() == fed
    out = DenoiseLoop(dit, sampler, x, context[:1], clip, y, 1.0, 1, cfg=False).run()
    ref, ref_fed = distill_reference(dit, x, context, clip, y, timesteps, shift)
    assert ref_fed == fed
    err, rel = rel_err(out, ref)
    print(f"distill {timesteps} shift {shift:g}: max abs {err:.2e}, rel {rel:.2e}")
    assert rel < 1e-5, f"few-step loop vs reference: max abs {err:.2e}, rel {rel:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("cfg_batch", [1, 2])
def test_cuda_graph_replay_without_cfg(setup, cfg_batch):
    dit = copy.deepcopy(setup[0]).cuda()  # a copy: `setup` is shared, and Module.cuda() works in place
    x, context, clip, y = (t.cuda() for t in setup[1:])
    sampler = make_sampler("distill", 4, 5.0, LIST)
    eager = DenoiseLoop(dit, sampler, x, context[:1], clip, y, 1.0, cfg_batch, cfg=False).run().clone()
    loop = DenoiseLoop(dit, sampler, x, context[:1], clip, y, 1.0, cfg_batch, cfg=False)
    loop.capture()
    err, rel = rel_err(loop.run(), eager)
    assert rel < 1e-5, f"CUDA graph vs eager: max abs {err:.2e}, rel {rel:.2e}"


# ---- --sample_timesteps through the pipeline and the CLI ------------------------------------------

def test_generate_with_sample_timesteps(pipe, frames, monkeypatch):
    calls, texts = spied(pipe, monkeypatch)
    video = pipe.generate("a red ball", *frames, sample_timesteps=LIST, sample_shift=5.0, **KW)
    assert video.shape == (3, 5, 64, 64) and torch.isfinite(video).all()
    assert calls == [(1, [t]) for t in (1000, 938, 833, 625)] and texts == [1]  # guide 1 by default
    r = pipe.last_request
    assert (r.sample_solver, r.sample_steps, r.sample_timesteps, r.guide_scale) == ("distill", 4, tuple(LIST), 1.0)
    assert r.to_json()["sample_timesteps"] == LIST
    calls.clear()
    pipe.generate("a red ball", *frames, sample_timesteps=LIST, guide_scale=3.0, **KW)  # CFG on if asked
    assert [n for n, _ in calls] == [2] * 4


@pytest.mark.parametrize("options,match", [
    (dict(sample_timesteps=[750, 1000]), "not strictly descending"),
    (dict(sample_timesteps=[1000, 0]), r"outside 1\.\.1000"),
    (dict(sample_timesteps=[]), "is empty"),
    (dict(sample_timesteps=[1000, 500], sample_steps=50), "drop --sample_steps"),
    (dict(sample_timesteps=[1000, 500], sample_solver="dpm++"), "drop one of them"),
    # an explicit unipc ran the distill sampler without a word: only the unset default defers to the list
    (dict(sample_timesteps=[1000, 500], sample_solver="unipc"), "--sample_solver unipc does not apply"),
])
def test_bad_timesteps_in_the_api(options, match):
    image = Image.new("RGB", (64, 64))
    with pytest.raises(InputError, match=match):
        Pipeline(StubBackend(), None, get_preset("tiny")).request("x", image, image, **options)


def few_step_args(ckpt, frames, out):
    args = _args(ckpt, frames, out)
    i = args.index("--sample_steps")
    return args[:i] + args[i + 2:]  # the step count comes from the list


@pytest.mark.parametrize("value,extra,says", [
    ("750,1000", [], "not strictly descending"), ("1000,1000", [], "not strictly descending"),
    ("1001,500", [], "outside 1..1000"), ("0", [], "outside 1..1000"), ("-5", [], "outside 1..1000"),
    ("", [], "empty"), ("1000,abc", [], "not integers"), ("1000,7.5", [], "not integers"),
    # a lost value ran the steps left without a word
    ("1000,,500", [], "has an empty item"), ("1000,750,", [], "has an empty item"),
    ("1000,500", ["--sample_solver", "dpm++"], "drop one of them"),
    ("1000,500", ["--sample_solver", "unipc"], "--sample_solver unipc does not apply"),
])
def test_bad_sample_timesteps_exit_2_in_one_line(tiny_ckpt, demo_frames, tmp_path, capsys, value, extra, says):
    args = few_step_args(tiny_ckpt, demo_frames, tmp_path / "v.mp4")
    assert run(args + ["--sample_timesteps", value, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("flf2v-run: error: --sample_") and says in err, err
    assert "1000,750,500,250" in err or "drop" in err
    assert not (tmp_path / "v.mp4").exists()


def test_cli_few_step_run_records_it(tiny_ckpt, demo_frames, tmp_path):
    out, metrics = tmp_path / "v.mp4", tmp_path / "m.json"
    args = few_step_args(tiny_ckpt, demo_frames, out)
    assert run(args + ["--sample_timesteps", "1000,750,500,250", "--sample_shift", "5",
                       "--metrics", str(metrics)]) == 0
    m = json.loads(metrics.read_text())["run"]
    assert (m["sample_solver"], m["sample_steps"], m["sample_timesteps"]) == ("distill", 4, LIST)
    assert (m["cfg"], m["cfg_batch"], m["guide_scale"], m["negative_prompt"]) == ("off", 1, 1.0, None)
