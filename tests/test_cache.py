"""Step cache (runtime/cache.py, runtime/denoise.py): the schedules equal the methods' authors' per-call
decisions, threshold 0 equals the uncached run, cached steps equal a hand-written TeaCache-style loop,
both step programs export, engines equal torch, the calibration command, and the CLI's errors."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import rel_err
from helpers import _args, diffusers_unipc, run

from flf2v.runtime import cache as C
from flf2v.runtime import calibrate_cache as K
from flf2v.runtime.denoise import DenoiseLoop
from flf2v.runtime.media import InputError
from flf2v.runtime.pipeline import Pipeline
from flf2v.runtime.scheduler import make_sampler

STEPS, SHIFT, GUIDE = 8, 16.0, 5.0
KW = dict(size="64*64", frame_num=9, seed=5, sample_steps=STEPS, output="latent", progress=False)


# ---- the authors' decisions, per DiT call (cond then uncond), re-typed from their files -------------

def nearest_interp(src, n):
    """MagCache4Wan2.1/magcache_generate.py @df81cb1 lines 27-34."""
    if n == 1:
        return np.array([src[-1]])
    return src[np.round(np.arange(n) * ((len(src) - 1) / (n - 1))).astype(int)]


def authors_magcache(mag_ratios, steps, thresh, K, retention=0.2):
    """MagCache4Wan2.1/magcache_generate.py @df81cb1: nearest_interp (lines 1005-1010) and magcache_forward's
    decision (lines 277-311). [steps][branch] compute flags."""
    r = np.asarray(mag_ratios)
    if len(r) != 2 * steps:
        r = np.concatenate([nearest_interp(r[0::2], steps).reshape(-1, 1),
                            nearest_interp(r[1::2], steps).reshape(-1, 1)], axis=1).reshape(-1)
    acc_ratio, acc_err, acc_steps = [1.0, 1.0], [0.0, 0.0], [0, 0]
    out = []
    for cnt in range(2 * steps):
        skip = False
        if cnt >= int(2 * steps * retention):
            b = cnt % 2
            acc_ratio[b] *= r[cnt]
            acc_steps[b] += 1
            acc_err[b] += np.abs(1 - acc_ratio[b])
            if acc_err[b] < thresh and acc_steps[b] <= K:
                skip = True
            else:
                acc_err[b], acc_steps[b], acc_ratio[b] = 0, 0, 1.0
        out.append(not skip)
    return [out[2 * i:2 * i + 2] for i in range(steps)]


def authors_teacache(change, coefficients, thresh, steps):
    """TeaCache4Wan2.1/teacache_generate.py @7c10efc lines 519-568, use_ret_steps=False (ret_steps 2,
    cutoff 2*steps-2); the modulated input is e, the same for both branches. [steps][branch] flags."""
    poly = np.poly1d(coefficients)
    acc, out = [0.0, 0.0], []
    for cnt in range(2 * steps):
        b, i = cnt % 2, cnt // 2
        if cnt < 2 or cnt >= 2 * steps - 2:
            calc, acc[b] = True, 0
        else:
            acc[b] += poly(change[i])
            calc = not acc[b] < thresh
            if calc:
                acc[b] = 0
        out.append(calc)
    return [out[2 * i:2 * i + 2] for i in range(steps)]


@pytest.mark.parametrize("steps,thresh,k", [(40, 0.24, 6), (40, 0.12, 4), (40, 0.12, 2), (50, 0.24, 6),
                                            (30, 0.24, 6), (10, 0.3, 2), (25, 0.1, 3)])
@pytest.mark.parametrize("area", ["720P", "480P"])
def test_magcache_schedule_equals_the_authors(steps, thresh, k, area):
    ratios = C.PUBLISHED[area][0]
    ref = authors_magcache(ratios, steps, thresh, k)
    assert all(a == b for a, b in ref), "the published cond and uncond curves disagree here: pick other settings"
    ours = C.magcache_schedule(C.Calibration(ratios, (), "").ratios(steps), thresh, k)
    assert list(ours) == [a for a, _ in ref]


def test_resampled_ratios_are_the_authors_nearest_interp():
    """The schedule test compares only skip flags, which ratios near 1 keep through an index off by one."""
    r = np.asarray(C.PUBLISHED["720P"][0])
    for steps in (50, 40, 30, 25, 10, 3, 2, 1):
        want = np.stack([nearest_interp(r[0::2], steps), nearest_interp(r[1::2], steps)], axis=1)
        assert np.array_equal(C.Calibration(r, (), "").ratios(steps), want), steps


def test_embedding_change_is_teacaches_distance():
    """TeaCache4Wan2.1/teacache_generate.py @7c10efc: ((e - prev).abs().mean() / prev.abs().mean()), the
    previous step's embedding in the denominator."""
    e = torch.randn(6, 3, 16, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 2, 6)[:, None, None]
    want = [0.0] + [((e[i] - e[i - 1]).abs().mean() / e[i - 1].abs().mean()).item() for i in range(1, len(e))]
    assert np.allclose(C.embedding_change(e), want, rtol=1e-6, atol=0), (C.embedding_change(e), want)


@pytest.mark.parametrize("steps,cfg", [(1, True), (2, True), (3, False)])
def test_magcache_computes_the_first_step_at_any_step_count(steps, cfg):
    """Few steps make the retained share of the calls round to none: step 0 is still computed (the loop has
    nothing cached before it)."""
    s = C.magcache_schedule(np.ones((steps, 2)), 10.0, None, cfg)
    assert s[0] and len(s) == steps, s


def test_magcache_recommended_setting_computes_a_third_of_the_steps():
    # The authors report 3.0x (10m03s vs 30m40s) for E024K6R02 on I2V 720p at 40 steps: 14 of 40 DiT steps.
    s = C.magcache_schedule(C.Calibration(C.MAGCACHE_I2V_720P, (), "").ratios(40), 0.24, 6)
    assert [i for i, c in enumerate(s) if c] == [0, 1, 2, 3, 4, 5, 6, 7, 14, 21, 27, 32, 35, 38]


@pytest.mark.parametrize("thresh", [0.05, 0.2, 0.3, 1.0])
@pytest.mark.parametrize("coefs", [C.TEACACHE_I2V_720P, C.TEACACHE_I2V_480P])
def test_teacache_schedule_equals_the_authors(thresh, coefs):
    change = np.abs(np.random.default_rng(0).normal(0.3, 0.2, 50))
    ref = authors_teacache(change, coefs, thresh, 50)
    ours = C.teacache_schedule(change, coefs, thresh)
    assert list(ours) == [a for a, _ in ref] and all(a == b for a, b in ref)
    assert 1 < sum(ours) < 50  # the settings skip some steps, not all


def test_threshold_zero_computes_every_step(tiny_ckpt):
    from flf2v.models.config import get_preset
    p = get_preset("tiny")
    cal = C.Calibration(C.MAGCACHE_I2V_720P, C.TEACACHE_I2V_720P, "")
    ts = make_sampler("unipc", 50, 5.0).timesteps
    # the authors' TeaCache skips at 0 where poly(change) < 0 (as here for small changes)
    assert not all(a for a, _ in authors_teacache(np.full(50, 0.01), C.TEACACHE_I2V_720P, 0.0, 50))
    for method in ("magcache", "teacache"):
        assert all(C.plan(method, 0.0, None, cal, ts, True, tiny_ckpt, p).compute)


def test_time_embedding_equals_the_dit(setup_dit):
    """The host-side e that TeaCache decides on equals the DiT's own (checkpoint weights read directly)."""
    dit, ckpt, preset = setup_dit
    t = make_sampler("unipc", 6, SHIFT).timesteps
    err, rel = rel_err(C.time_embeddings(ckpt, preset, t), dit.time(t)[0])
    assert rel < 1e-6, f"host e vs the DiT's: max abs {err:.2e}, rel {rel:.2e}"


@pytest.fixture(scope="module")
def setup_dit(tiny_ckpt):
    from flf2v.models import checkpoint as ck
    preset = ck.preset_for(tiny_ckpt)
    return ck.load_dit(tiny_ckpt, torch.float32, preset), tiny_ckpt, preset


# ---- the loop ---------------------------------------------------------------------------------------

def cache_fns(dit):
    return (lambda *a: dit(*a, return_hidden=True)), dit.forward_cached


def hidden_shape(dit, x):
    return (x.shape[2], x.shape[3] // 2, x.shape[4] // 2, dit.cfg.dim)


SCHEDULE = (True, True, False, False, True, False, True, False)


def teacache_style_loop(dit, x, context, clip, y, compute, cfg=True):
    """Written from the TeaCache / MagCache forward: a computed step keeps residual = blocks' output -
    input per branch, a skipped one adds it to its own patch-embedded input; diffusers' UniPC steps."""
    sched = diffusers_unipc(len(compute), SHIFT)
    residual = {}
    for i, t in enumerate(sched.timesteps):
        tt = torch.tensor([int(t)])
        e, e0 = dit.time(tt)
        v = []
        for branch, ctx in enumerate((context[:1], context[1:]) if cfg else (context[:1],)):
            h = dit.tokens(x, y)
            if compute[i]:
                out = dit.blocks_forward(h, e0, ctx, clip)
                residual[branch] = out - h
            else:
                out = h + residual[branch]
            v.append(dit.unpatchify(out, e))
        x = sched.step(v[1] + GUIDE * (v[0] - v[1]) if cfg else v[0], t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("cfg,cfg_batch", [(True, 2), (True, 1), (False, 1), (False, 2)])
def test_skips_equal_a_hand_written_loop(dit_setup, cfg, cfg_batch):
    dit, x, context, clip, y = dit_setup
    ctx = context if cfg else context[:1]
    loop = DenoiseLoop(dit, make_sampler("unipc", len(SCHEDULE), SHIFT), x, ctx, clip, y, GUIDE, cfg_batch, cfg,
                       cache_fns(dit), hidden_shape(dit, x))
    out = loop.run(compute=SCHEDULE)
    ref = teacache_style_loop(dit, x, context, clip, y, SCHEDULE, cfg)
    err, rel = rel_err(out, ref)
    full = teacache_style_loop(dit, x, context, clip, y, (True,) * len(SCHEDULE), cfg)
    skipped = rel_err(out, full)[1]
    print(f"cfg={cfg} batch {cfg_batch}: cached loop vs hand-written: max abs {err:.2e}, rel {rel:.2e}; "
          f"vs no skip rel {skipped:.2e}")
    # measured max rel 1.46e-6 (CFG batch 2), 2.6e-7 without CFG: our fp32 sampler steps vs diffusers'
    assert rel < 4e-6, f"cached loop vs the hand-written one: max abs {err:.2e}, rel {rel:.2e}"
    assert skipped > 1e-3, f"the skips changed nothing (rel {skipped:.2e} to the full run): nothing was tested"


@pytest.mark.parametrize("cfg_batch", [1, 2])
def test_no_skip_equals_the_plain_loop_exactly(dit_setup, cfg_batch):
    dit, x, context, clip, y = dit_setup
    plain = DenoiseLoop(dit, make_sampler("unipc", 6, SHIFT), x, context, clip, y, GUIDE, cfg_batch).run().clone()
    loop = DenoiseLoop(dit, make_sampler("unipc", 6, SHIFT), x, context, clip, y, GUIDE, cfg_batch, True,
                       cache_fns(dit), hidden_shape(dit, x))
    assert torch.equal(loop.run(compute=(True,) * 6), plain)
    with pytest.raises(ValueError, match="the first True"):
        loop.run(compute=(False,) * 6)


class CachedStep(torch.nn.Module):
    def __init__(self, loop):
        super().__init__()
        self.loop = loop

    def forward(self):
        self.loop.step_cached()


@pytest.mark.parametrize("cfg,cfg_batch", [(True, 2), (True, 1), (False, 1)])
def test_both_step_programs_export(dit_setup, cfg, cfg_batch):
    """torch.export traces each step program whole: no host sync or data-dependent control flow in either."""
    dit, x, context, clip, y = dit_setup
    ctx = context if cfg else context[:1]
    loop = DenoiseLoop(dit, make_sampler("unipc", 6, SHIFT), x, ctx, clip, y, GUIDE, cfg_batch, cfg,
                       cache_fns(dit), hidden_shape(dit, x))
    for i in range(2):
        loop._load(i)
        loop.step()
    state = ("t", "coef", "i", "x", "last", "m1", "m2", "hidden", "x_prev")
    for program, mod in (("full", loop), ("cached", CachedStep(loop))):
        exported = torch.export.export(mod, ()).module()
        target = exported.loop if program == "cached" else exported
        loop._load(2)
        before = {n: getattr(loop, n).clone() for n in state}
        for n in state:
            getattr(target, n).copy_(before[n])
        exported()
        mod()
        for n in ("x", "hidden", "x_prev"):
            err, rel = rel_err(getattr(target, n), getattr(loop, n))
            assert rel < 1e-6, f"exported {program} step vs eager, {n}: max abs {err:.2e}, rel {rel:.2e}"
        for n in state:  # the next program starts from the same state
            getattr(loop, n).copy_(before[n])


# ---- the pipeline on the torch backend and on engines ---------------------------------------------------

@pytest.fixture(scope="module")
def calibration(tiny_ckpt, demo_frames, tmp_path_factory):
    """A calibration of the tiny checkpoint by flf2v-calibrate-cache (8 steps, the minimum)."""
    from flf2v.runtime.media import load_image
    out = tmp_path_factory.mktemp("cal") / "cal.json"
    frames = [load_image(p) for p in demo_frames]
    return K.run(tiny_ckpt, *frames, "a red ball", out=out, progress=False, size="64*64", frame_num=5, seed=0)


def test_threshold_zero_equals_the_uncached_run(pipe, frames, calibration):
    ref = pipe.generate("a red ball", *frames, **KW)
    for method in ("magcache", "teacache"):
        out = pipe.generate("a red ball", *frames, cache=method, cache_threshold=0, cache_calibration=calibration, **KW)
        assert torch.equal(out, ref) and pipe.last_cache.to_json()["steps_skipped"] == 0


def engine_runs(pipe, engines, frames, calibration, **kw):
    """(torch, engines) latents of the same cached runs, and the schedule."""
    ort = Pipeline.from_engines(engines)
    out = []
    for p in (pipe, ort):
        out.append(p.generate("a red ball", *frames, cache_calibration=calibration, **kw, **KW))
    assert pipe.last_cache.compute == ort.last_cache.compute and not all(ort.last_cache.compute)
    return out, ort


@pytest.mark.parametrize("method,thresh", [("magcache", 0.3), ("teacache", 1.0)])
@pytest.mark.parametrize("cfg_batch", [1, 2])
def test_engines_equal_torch_with_skips(pipe, frames, tiny_engines, calibration, method, thresh, cfg_batch):
    (a, b), ort = engine_runs(pipe, tiny_engines, frames, calibration, cache=method, cache_threshold=thresh,
                              cfg_batch=cfg_batch)
    err, rel = rel_err(b, a)
    print(f"{method} {thresh} batch {cfg_batch}: schedule {ort.last_cache.to_json()['schedule']}, ORT vs torch "
          f"max abs {err:.2e}, rel {rel:.2e}")
    assert rel < 1e-4, f"ORT vs torch, cached run: max abs {err:.2e}, rel {rel:.2e}"


def test_dynamic_engines_cache_at_two_shapes(pipe, frames, tiny_dynamic_engines, calibration):
    for size, frame_num in (("64*64", 5), ("96*64", 9)):  # a landscape grid (the dynamic tiny build's profiles)
        kw = dict(KW, size=size, frame_num=frame_num)
        a = pipe.generate("a red ball", *frames, cache="magcache", cache_threshold=0.3, cache_calibration=calibration,
                          **kw)
        ort = Pipeline.from_engines(tiny_dynamic_engines)
        b = ort.generate("a red ball", *frames, cache="magcache", cache_threshold=0.3, cache_calibration=calibration,
                         **kw)
        err, rel = rel_err(b, a)
        assert not all(ort.last_cache.compute)
        assert rel < 1e-4, f"dynamic ORT vs torch at {size}/{frame_num}: max abs {err:.2e}, rel {rel:.2e}"


# ---- calibration ------------------------------------------------------------------------------------

def test_calibration_records_the_residual_magnitude_ratios(calibration, tiny_ckpt, frames):
    """MagCache's curve, recomputed with hooks around the blocks of a plain uncached run."""
    d = json.loads(calibration.read_text())
    p = Pipeline.from_checkpoint(tiny_ckpt)
    blocks, norms = p.backend.dit.blocks, []
    seen = {}
    blocks[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0].clone()))
    blocks[-1].register_forward_hook(lambda m, a, out: norms.append((out - seen["x"]).norm(dim=-1)))
    p.generate("a red ball", *frames, size="64*64", frame_num=5, seed=0, sample_steps=8, output="latent",
               progress=False)
    ratios = [[1.0, 1.0]] + [(norms[i] / norms[i - 1]).mean(dim=1).tolist() for i in range(1, len(norms))]
    got = np.array(d["magcache"]["mag_ratios"]).reshape(-1, 2)
    assert got.shape == (8, 2) and d["magcache"]["steps"] == 8
    assert np.abs(got - np.array(ratios)).max() < 6e-6, (got, ratios)
    xs, ys = np.array(d["teacache"]["points"]).T
    assert np.allclose(np.polyfit(xs, ys, 4), d["teacache"]["coefficients"], rtol=1e-3, atol=1e-3)
    cal = C.read_calibration(calibration)
    assert cal.ratios(4).shape == (4, 2) and cal.source == str(calibration)


def test_calibrate_cli(tiny_ckpt, demo_frames, tmp_path, capsys):
    base = ["--ckpt_dir", str(tiny_ckpt), "--first_frame", str(demo_frames[0]), "--last_frame", str(demo_frames[1]),
            "--prompt", "a red ball", "--size", "64*64", "--frame_num", "5", "--quiet"]
    assert K.main([*base, "--sample_steps", "4", "--out", str(tmp_path / "a.json")]) == 2
    assert "at least 8 steps" in capsys.readouterr().err and not (tmp_path / "a.json").exists()
    assert K.main([*base, "--out", str(tmp_path / "b.json")]) == 0
    d = json.loads((tmp_path / "b.json").read_text())
    assert d["format"] == C.FORMAT and d["run"]["sample_steps"] == 8 and len(d["magcache"]["mag_ratios"]) == 16
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]  # written whole, no temporary left



@pytest.mark.parametrize("flags, says", [(["--frame_num", "10"], "--frame_num 10"),
                                         (["--sample_shift", "nan"], "--sample_shift"),
                                         (["--device", "cuda:0"], "--device cuda:0: no CUDA GPU"),
                                         (["--out", ""], "--out is empty"),  # wrote the checkpoint's own file
                                         (["--out", "c.txt"], "--out c.txt must end in .json"),
                                         ([], "--last_frame needs --first_frame")])
def test_calibrate_cli_refuses_before_any_weight_loads(tiny_ckpt, demo_frames, tmp_path, capsys, monkeypatch,
                                                       flags, says):
    if "--device" in flags and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is usable here")
    monkeypatch.setattr(K.Recorder, "__init__", lambda *a, **k: pytest.fail("weights loaded"))
    first = ["--first_frame", str(demo_frames[0])] if flags else []  # [] : --last_frame alone
    assert K.main(["--ckpt_dir", str(tiny_ckpt), "--last_frame", str(demo_frames[1]), "--size", "64*64", "--out",
                   str(tmp_path / "c.json"), "--quiet", *first, *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoints_own_calibration_is_found_and_checked(tiny_ckpt, calibration, tmp_path):
    from flf2v.models.config import get_preset
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    p = get_preset("tiny")
    with pytest.raises(C.CacheError, match="flf2v-calibrate-cache --ckpt_dir"):
        C.find_calibration(p, ckpt, "64*64")
    shutil.copy(calibration, ckpt / C.CALIBRATION_FILE)
    assert C.find_calibration(p, ckpt, "64*64").source == str(ckpt / C.CALIBRATION_FILE)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "eps": 2e-6}))  # another checkpoint now
    with pytest.raises(C.CacheError, match="another checkpoint"):
        C.find_calibration(p, ckpt, "64*64")
    # given by name, it runs, with a warning (a near model's calibration may be what the user wants)
    with pytest.warns(UserWarning, match=r"made for another checkpoint \(tiny\)"):
        C.find_calibration(p, ckpt, "64*64", path=ckpt / C.CALIBRATION_FILE)


def test_published_calibration_for_the_14b_models():
    from flf2v.models.config import get_preset
    for name in ("flf2v-14B", "i2v-14B"):
        p = get_preset(name)
        assert C.published(p, "1280*720").mag_ratios == C.MAGCACHE_I2V_720P
        assert C.published(p, "832*480").coefficients == C.TEACACHE_I2V_480P
    assert "none published for FLF2V" in C.published(get_preset("flf2v-14B"), "1280*720").source
    assert len(C.MAGCACHE_I2V_720P) == len(C.MAGCACHE_I2V_480P) == 80
    assert C.published(get_preset("tiny"), "64*64") is None


# ---- CLI ----------------------------------------------------------------------------------------------

def test_cli_cached_run_writes_the_schedule(tiny_ckpt, demo_frames, calibration, tmp_path):
    out, metrics = tmp_path / "v.mp4", tmp_path / "m.json"
    args = _args(tiny_ckpt, demo_frames, out, "--cache", "magcache", "--cache_threshold", "0.3",
                 "--cache_calibration", str(calibration), "--metrics", str(metrics))
    args[args.index("--sample_steps") + 1] = "8"
    assert run(args) == 0 and out.exists()
    m = json.loads(metrics.read_text())
    c = m["cache"]
    assert len(c["schedule"]) == 8 and c["schedule"][0] == "F" and c["steps_skipped"] == c["schedule"].count("c") > 0
    assert m["run"]["cache"] == "magcache" and m["run"]["cache_threshold"] == 0.3


def test_cli_says_another_checkpoints_calibration_once(tiny_ckpt, demo_frames, calibration, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "eps": 2e-6}))  # another checkpoint
    args = _args(ckpt, demo_frames, tmp_path / "v.mp4", "--cache", "magcache", "--cache_calibration", str(calibration))
    args[args.index("--sample_steps") + 1] = "8"
    # a process of its own: pytest's warning filters hid the second line
    r = subprocess.run([sys.executable, "-c", "import sys; from flf2v.runtime.cli import main; sys.exit(main())",
                        *args], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.count("was made for another checkpoint") == 1, r.stderr[-2000:]


@pytest.mark.parametrize("extra,msg", [
    (["--cache_threshold", "0.2"], "add --cache magcache"),
    (["--cache", "magcache", "--cache_threshold", "-1"], "must be a finite number >= 0"),
    (["--cache", "teacache", "--cache_max_skips", "-2"], "must be an integer >= 0"),
    (["--cache", "magcache", "--sample_steps", "8"], "run flf2v-calibrate-cache --ckpt_dir"),
    # a mistyped path, or the wrong file, was told to run flf2v-calibrate-cache again
    (["--cache", "magcache", "--sample_steps", "8", "--cache_calibration", "/nonexistent.json"],
     "/nonexistent.json: no such file; check the path"),
    (["--cache", "magcache", "--sample_steps", "8", "--cache_calibration", "{frame}"],
     "is not a flf2v-calibrate-cache file"),
])
def test_cli_cache_mistakes_exit_2(tiny_ckpt, demo_frames, tmp_path, capsys, extra, msg):
    out = tmp_path / "v.mp4"
    extra = [str(demo_frames[0]) if x == "{frame}" else x for x in extra]
    assert run(_args(tiny_ckpt, demo_frames, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("extra,says", [(["--sample_steps", "4"], "this run has 4: give --sample_steps 8 or more, "),
                                        (["--sample_timesteps", "1000,750,500,250"], "--sample_timesteps run has 4")])
def test_cli_cache_refuses_a_run_too_short_for_it(tiny_ckpt, demo_frames, calibration, tmp_path, capsys, extra, says):
    """A 4-step distilled run with --cache magcache computed 1 of its 4 steps, without a word."""
    out = tmp_path / "v.mp4"
    args = _args(tiny_ckpt, demo_frames, out, "--cache", "magcache", "--cache_calibration", str(calibration))
    del args[args.index("--sample_steps"):args.index("--sample_steps") + 2]
    assert run([*args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a run of at least 8 steps" in err and says in err and "\n" not in err, err
    assert not out.exists()
    assert run([*args, *extra, "--cache_threshold", "0"]) == 0  # threshold 0 skips nothing: allowed


def test_a_cfg_free_calibration_in_a_cfg_run_is_said(pipe, frames, calibration, tmp_path):
    """Its uncond ratios repeat the cond ones; a CFG run used them as the uncond curve without a word."""
    import warnings
    d = json.loads(calibration.read_text())
    free = tmp_path / "free.json"
    free.write_text(json.dumps({**d, "run": {**d["run"], "cfg": "off"}}))
    kw = dict(cache="magcache", size="64*64", frame_num=5, sample_steps=8)
    with pytest.warns(UserWarning, match=r"free\.json was recorded without CFG .* this run has CFG"):
        pipe.request("x", *frames, cache_calibration=free, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.request("x", *frames, cache_calibration=calibration, **kw)
        pipe.request("x", *frames, cache_calibration=free, guide_scale=1.0, **kw)
        pipe.request("x", *frames, cache_calibration=free, **dict(kw, cache="teacache"))  # one curve, no branches
    for record in (None, "x"):  # not a run's record: read as made with CFG (was an AttributeError)
        free.write_text(json.dumps({**d, "run": record}))
        pipe.request("x", *frames, cache_calibration=free, **kw)


def test_engines_without_the_cached_graph_are_refused(tiny_engines, tmp_path, frames, calibration):
    folder = tmp_path / "old"
    shutil.copytree(tiny_engines, folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["engines"] = {k: v for k, v in m["engines"].items() if not k.startswith("dit_cached")}
    (folder / "manifest.json").write_text(json.dumps(m))
    p = Pipeline.from_engines(folder)
    with pytest.raises(InputError, match="built without the step cache.*flf2v-build"):
        p.generate("a red ball", *frames, cache="magcache", cache_calibration=calibration, **KW)
    p.generate("a red ball", *frames, **dict(KW, sample_steps=2))  # uncached runs are unaffected


def test_a_read_only_checkpoint_is_told_to_calibrate_into_another_file(tiny_ckpt, monkeypatch):
    """The fix for a missing calibration wrote into the checkpoint, which a read-only share refuses."""
    from flf2v.models.config import get_preset
    with pytest.raises(C.CacheError) as e:
        C.find_calibration(get_preset("tiny"), tiny_ckpt, "64*64")
    assert "--out" not in str(e.value), e.value
    monkeypatch.setattr(C.os, "access", lambda path, mode: False)  # as a read-only mount answers
    with pytest.raises(C.CacheError, match=f"read-only: run flf2v-calibrate-cache --ckpt_dir {tiny_ckpt} --out "
                                           f"FILE.json once and pass --cache_calibration FILE.json"):
        C.find_calibration(get_preset("tiny"), tiny_ckpt, "64*64")


def test_calibrate_cli_a_file_as_checkpoint_is_blamed_on_ckpt_dir(tmp_path, capsys):
    """The default --out goes into --ckpt_dir: a file given as the checkpoint was said as "--out FILE/...: FILE is
    a file", a flag the user never gave."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert K.main(["--ckpt_dir", str(afile), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ckpt_dir" in err[0] and "--out" not in err[0], err
