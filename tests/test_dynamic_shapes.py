"""Dynamic shapes (issue 12): one build of the tiny engines serves every grid and frame count of its
profiles, each run equal to the torch reference; grids outside them are refused with the build that
serves them; the 14B profiles cover every official size and first-frame aspect ratio."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from flf2v.export import contracts as C
from flf2v.export import manifest as M
from flf2v.models.config import get_preset
from flf2v.runtime.cli import main
from flf2v.runtime.engine_folders import EngineError, find_engines
from flf2v.runtime.media import load_image, read_video
from flf2v.runtime.pipeline import Pipeline

KW = dict(sample_steps=2, seed=5, progress=False)


@pytest.fixture(scope="module")
def dynamic_engines(tiny_dynamic_engines):
    return tiny_dynamic_engines


def frame(tmp_path, w, h, seed=0) -> Image.Image:
    path = tmp_path / f"f{w}x{h}.png"
    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8")).save(path)
    return load_image(path)


# ---- the 14B profiles -------------------------------------------------------------------------------

def spec_grid(w: int, h: int, area: int) -> tuple[int, int]:
    """The spec's sizing (wan21-flf2v.md, data flow 1), written out here: latent (h, w) of a w x h frame."""
    return (round(math.sqrt(area * h / w) // 8 // 2 * 2), round(math.sqrt(area * w / h) // 8 // 2 * 2))


@pytest.mark.parametrize("size", ["1280*720", "720*1280", "832*480", "480*832", "1024*1024"])
@pytest.mark.parametrize("aspect", [1 / 2.4, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.33, 2.4])
def test_14b_dynamic_serves_every_official_size_and_aspect(size, aspect):
    p = get_preset("flf2v-14B")
    shape = C.get_shape(p)  # the default build
    area = math.prod(int(v) for v in size.split("*"))
    lat_h, lat_w = spec_grid(int(aspect * 1000), 1000, area)  # a first frame aspect:1 (W/H)
    for frames in (5, 41, 81):
        assert shape.profile_of(p, frames, 8 * lat_h, 8 * lat_w) is not None, (size, aspect, frames, lat_h, lat_w)
    assert shape.profile_of(p, 85, 8 * lat_h, 8 * lat_w) is None  # 85 frames: past the range


def test_14b_profiles():
    p = get_preset("flf2v-14B")
    dyn = C.get_shape(p)
    land, port = dyn.profiles
    # opt: 720p (latent 21 x 90 x 160 -> token grid 45 x 80) and its transpose
    assert land.opt == (21, 45, 80) and port.opt == (21, 80, 45)
    # 3:1 at the largest official area (1024*1024) is outside every box: latent 72 x 220
    assert spec_grid(3000, 1000, 1024 * 1024) == (72, 220) and dyn.profile_of(p, 81, 576, 1760) is None
    # two boxes, not one: each box's largest grid holds < 1.8x the tokens of 720p; one box over both
    # orientations would reach long side x long side, > 2.5x
    tokens = [math.prod(q.max) for q in dyn.profiles]
    one_box = 21 * max(q.max[1] for q in dyn.profiles) * max(q.max[2] for q in dyn.profiles)
    assert max(tokens) / (21 * 45 * 80) < 1.8 and one_box / (21 * 45 * 80) > 2.5, (tokens, one_box)
    # the 480p class is smaller than the full one
    small = C.get_shape(p, "dynamic-480p")
    assert all(math.prod(a.max) < math.prod(b.max) for a, b in zip(small.profiles, dyn.profiles))
    assert small.profile_of(p, 81, 720, 1280) is None and small.profile_of(p, 81, 480, 832) is not None


@pytest.mark.parametrize("model", ["flf2v-14B", "i2v-14B", "tiny", "small"])
def test_opt_lies_in_every_profile(model):
    p = get_preset(model)
    for shape in C.dynamic_shapes(p).values():
        assert all(q.holds(q.opt) and q.holds(q.min) and q.holds(q.max) for q in shape.profiles), shape


def test_trt_profiles_of_the_dit():
    """What flf2v-build hands polygraphy for the 14B DiT: min/opt/max of every input, per profile."""
    from flf2v.export.trt_engine import trt_profiles
    p = get_preset("flf2v-14B")
    dyn = C.get_shape(p)
    g = C.get_graph(p, dyn, "bf16", "dit_b2")
    rows = trt_profiles(g, [tuple(dict(zip(C.DIMS, d)) for d in (q.min, q.opt, q.max)) for q in dyn.profiles])
    x = {name: (lo, opt, hi) for name, lo, opt, hi in rows[0]}["x"]
    assert x[1] == (2, 16, 21, 90, 160)  # 720p, 81 frames
    assert x[0][2] == 2 and x[2][2] == 21  # 5..81 frames
    ctx = {name: (lo, opt, hi) for name, lo, opt, hi in rows[1]}["context"]
    assert ctx[0] == ctx[1] == ctx[2] == (2, 512, 4096)  # static inputs: one shape


# ---- one tiny build, many shapes --------------------------------------------------------------------

def test_manifest_records_the_ranges(dynamic_engines):
    m = json.loads((dynamic_engines / M.MANIFEST).read_text())
    assert m["shape"]["dynamic"] and m["shape"]["frames"] == [5, 17] and len(m["shape"]["profiles"]) == 2
    x = m["engines"]["dit_b2"]["inputs"][0]
    assert x["name"] == "x" and x["shape"] == [2, 16, "T", "2*hp", "2*wp"]
    assert m["engines"]["vae_decode_chunk"]["outputs"][0]["shape"] == [1, 3, 4, "16*hp", "16*wp"]
    assert m["engines"]["t5"]["inputs"][0]["shape"] == [2, 512]


@pytest.fixture(scope="module")
def pipes(tiny_ckpt, dynamic_engines):
    """One torch reference and one engine pipeline for every run: the engines switch shapes run to run."""
    return Pipeline.from_checkpoint(tiny_ckpt), Pipeline.from_engines(dynamic_engines)


# first frame (W, H), frames -> the output (W, H) by the spec's sizing at the tiny default area 64*64
RUNS = [((64, 64), 9, (64, 64)), ((640, 360), 9, (80, 48)), ((360, 640), 9, (48, 80)),
        ((500, 375), 9, (64, 48)), ((1000, 400), 9, (96, 32)), ((640, 360), 5, (80, 48)),
        ((1000, 400), 13, (96, 32)), ((64, 64), 13, (64, 64))]


# Measured (tiny checkpoint, seed 5, 2 steps, onnxruntime 1.32.0, AMD EPYC 2 vCPUs): max abs 1e-5..3e-5.
# Tolerance: the static engines' (test_runtime.py), 1e-4 and PSNR 100 dB.
@pytest.mark.parametrize("first_wh,frames,out_wh", RUNS)
def test_every_shape_matches_torch(pipes, tmp_path, demo_frames, first_wh, frames, out_wh):
    assert (spec_grid(*first_wh, 64 * 64)[1] * 8, spec_grid(*first_wh, 64 * 64)[0] * 8) == out_wh
    ref_pipe, pipe = pipes
    first, last = frame(tmp_path, *first_wh), load_image(demo_frames[1])
    ref = ref_pipe.generate("a red ball", first, last, frame_num=frames, **KW)
    out = pipe.generate("a red ball", first, last, frame_num=frames, **KW)
    assert out.shape == (3, frames, out_wh[1], out_wh[0])
    err = (out - ref).abs().max().item()
    mse = ((out - ref) ** 2).mean().item()
    psnr = 10 * math.log10(4 / mse) if mse else math.inf
    assert err < 1e-4 and psnr > 100, f"{first_wh}, {frames} frames: max abs {err:.2e}, PSNR {psnr:.1f} dB"


def test_kept_loops_give_the_same_video(dynamic_engines, demo_frames, tmp_path):
    """A run at a shape already used reuses its kept denoising loop, with the new run's inputs: its video
    equals a fresh pipeline's."""
    pipe = Pipeline.from_engines(dynamic_engines)
    first, last = load_image(demo_frames[0]), load_image(demo_frames[1])
    wide = frame(tmp_path, 640, 360)
    a = pipe.generate("x", first, last, **KW)
    b = pipe.generate("x", wide, last, **KW)
    loops = dict(pipe.loops)
    again = dict(KW, seed=9)
    c = pipe.generate("another prompt", last, first, **again)  # same grid as `a`: a kept loop, new inputs
    assert len(pipe.loops) == 2 and set(pipe.loops) == set(loops)
    assert all(pipe.loops[k] is loops[k] for k in loops)  # kept, not rebuilt
    fresh = Pipeline.from_engines(dynamic_engines).generate("another prompt", last, first, **again)
    assert a.shape != b.shape and not torch.equal(a, c)
    assert torch.equal(c, fresh), f"kept loop vs a fresh pipeline: max abs {(c - fresh).abs().max().item():.2e}"


def test_outside_the_ranges_exits_2_with_the_build_that_serves(tiny_ckpt, dynamic_engines, demo_frames, tmp_path,
                                                                 capsys):
    out = tmp_path / "v.mp4"
    narrow = tmp_path / "narrow.png"
    Image.new("RGB", (2000, 300), (200, 10, 10)).save(narrow)  # 6.7:1 -> latent 2 x 20: no profile holds it
    base = ["--ckpt_dir", str(tiny_ckpt), "--last_frame", str(demo_frames[1]), "--prompt", "x",
            "--engines", str(dynamic_engines), "--save_file", str(out), "--quiet"]
    assert main(base + ["--first_frame", str(narrow)]) == 2
    err = capsys.readouterr().err
    assert "`flf2v-build " in err and "--preset 160x16x9" in err and err.count("\n") == 1, err
    assert main(base + ["--first_frame", str(demo_frames[0]), "--frame_num", "21"]) == 2  # frames 5..17 built
    err = capsys.readouterr().err
    assert "--preset 64x64x21" in err and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob("*.mp4*"))


def test_pipeline_refuses_outside_the_ranges(dynamic_engines, demo_frames):
    pipe = Pipeline.from_engines(dynamic_engines)
    first, last = (load_image(p) for p in demo_frames)
    with pytest.raises(EngineError, match="--preset 64x64x21"):
        pipe.generate("x", first, last, frame_num=21, **KW)


def test_static_folder_wins_where_it_serves(tiny_ckpt, tiny_engines, dynamic_engines, tmp_path, demo_frames):
    """A root with both: the static folder for its own shape, the dynamic one for any other."""
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tiny_engines, root / "tiny")
    os.symlink(dynamic_engines, root / "dynamic")
    preset = get_preset("tiny")

    def pick(h, w, f):
        return find_engines([root], tiny_ckpt, preset, "ort", lambda m: M.serves(m, preset, h, w, f))[0]

    assert pick(64, 64, 9).name == "tiny"
    assert pick(48, 80, 9).name == "dynamic" and pick(64, 64, 13).name == "dynamic"
    assert pick(16, 160, 9) is None
    out = tmp_path / "v.mp4"
    wide = tmp_path / "wide.png"
    Image.new("RGB", (640, 360), (20, 90, 200)).save(wide)
    assert main(["--ckpt_dir", str(tiny_ckpt), "--first_frame", str(wide), "--last_frame", str(demo_frames[1]),
                 "--prompt", "x", "--engines", str(root), "--sample_steps", "1", "--save_file", str(out),
                 "--quiet"]) == 0
    assert read_video(out).shape == (9, 48, 80, 3)


@pytest.mark.gpu
def test_cuda_graph_kept_per_shape(tiny_ckpt, demo_frames, tmp_path):
    """Torch backend on CUDA: A, B, A reuses A's captured graph (no recapture) and gives A's video again,
    which equals an eager run."""
    pipe = Pipeline.from_checkpoint(tiny_ckpt, device="cuda")
    first, last = load_image(demo_frames[0]), load_image(demo_frames[1])
    wide = frame(tmp_path, 640, 360)
    a = pipe.generate("x", first, last, **KW)
    graph_a = next(loop.graph for key, loop in pipe.loops.items() if key[0][3:] == (8, 8))
    pipe.generate("x", wide, last, **KW)
    c = pipe.generate("x", first, last, **KW)
    assert next(loop.graph for key, loop in pipe.loops.items() if key[0][3:] == (8, 8)) is graph_a
    eager = Pipeline.from_checkpoint(tiny_ckpt, device="cuda", cuda_graph=False).generate("x", first, last, **KW)
    err, rel = (c - a).abs().max().item(), (c - eager).abs().max().item()
    assert err == 0 and rel < 1e-5, f"replayed vs first: max abs {err:.2e}; vs eager {rel:.2e}"


def test_damaged_profiles_are_refused_in_one_line(dynamic_engines, tiny_ckpt, tmp_path):
    import shutil
    folder = shutil.copytree(dynamic_engines, tmp_path / "dynamic")
    m = json.loads((folder / M.MANIFEST).read_text())
    m["shape"]["profiles"] = [{"min": [2, 2], "opt": [3, 4, 4], "max": [5, 4, 7]}]
    (folder / M.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(EngineError, match="unreadable manifest") as e:
        Pipeline.from_engines(folder, tiny_ckpt)
    assert "\n" not in str(e.value) and "flf2v-build" in str(e.value)
