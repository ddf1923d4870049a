"""Engine backends end to end: ORT engines reproduce the torch reference video; folders that cannot
serve the run are refused with the command that rebuilds them."""
import json
import math
import shutil

import onnx
import pytest

from flf2v.runtime.cli import main
from flf2v.runtime.engine_folders import EngineError, check_external_data
from flf2v.runtime.ort_backend import OrtBackend
from flf2v.runtime.media import load_image, read_video
from flf2v.runtime.pipeline import Pipeline

KW = dict(size="64*64", frame_num=9, sample_steps=4, seed=11, progress=False)


# Measured (tiny checkpoint seed 0, seeds 11-13, 4 steps, onnxruntime 1.31.1 on an AMD EPYC Zen 4): ORT vs
# torch video max abs 2.6e-5..3.3e-5 (unipc), 1.9e-5..2.6e-5 (dpm++), PSNR 115-118 dB; tolerance 1e-4, 100 dB.
@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_ort_video_equals_torch_video(tiny_ckpt, tiny_engines, demo_frames, solver):
    # dpm++ starts at t = 1000: the engines' time table must have that row (it once failed in ORT's Gather)
    first, last = (load_image(p) for p in demo_frames)
    kw = {**KW, "sample_solver": solver}
    ref = Pipeline.from_checkpoint(tiny_ckpt).generate("a red ball", first, last, **kw)
    out = Pipeline.from_engines(tiny_engines).generate("a red ball", first, last, **kw)
    err = (out - ref).abs().max().item()
    mse = ((out - ref) ** 2).mean().item()
    psnr = 10 * math.log10(4 / mse) if mse else math.inf  # peak-to-peak 2 for [-1, 1] video
    assert err < 1e-4 and psnr > 100, f"ORT vs torch video ({solver}): max abs {err:.2e}, PSNR {psnr:.1f} dB"


def test_cfg_as_two_batch1_calls(tiny_ckpt, tiny_engines, demo_frames):
    first, last = (load_image(p) for p in demo_frames)
    pipe = Pipeline.from_engines(tiny_engines)
    a = pipe.generate("x", first, last, cfg_batch=2, **KW)
    b = pipe.generate("x", first, last, cfg_batch=1, **KW)
    err = (a - b).abs().max().item()
    # measured 5.5e-6..1.3e-5 (seeds 11-13, both solvers, 4 steps); tolerance 4e-5
    assert err < 4e-5, f"batch-2 vs two batch-1 CFG: max abs {err:.2e}"


def test_cli_ort_backend(tiny_ckpt, tiny_engines, demo_frames, tmp_path):
    out = tmp_path / "v.mp4"
    rc = main(["--ckpt_dir", str(tiny_ckpt), "--first_frame", str(demo_frames[0]), "--last_frame",
               str(demo_frames[1]), "--prompt", "x", "--engines", str(tiny_engines),
               "--sample_steps", "2", "--save_file", str(out), "--quiet"])
    assert rc == 0 and read_video(out).shape == (9, 64, 64, 3)


def test_engine_shape_mismatch(tiny_engines, demo_frames):
    first, last = (load_image(p) for p in demo_frames)
    with pytest.raises(EngineError, match="flf2v-build .*--preset dynamic"):
        Pipeline.from_engines(tiny_engines).generate("x", first, last, **{**KW, "frame_num": 5})


@pytest.fixture
def engines_copy(tiny_engines, tmp_path):
    return shutil.copytree(tiny_engines, tmp_path / "e")


def test_engines_of_another_checkpoint(engines_copy, tmp_path):
    from flf2v.models.config import get_preset
    from flf2v.models.make_tiny import write_tiny_checkpoint
    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(EngineError, match="another checkpoint.*flf2v-build --ckpt_dir "):
        OrtBackend(engines_copy, other, get_preset("tiny"))


def test_damaged_or_missing_engine(engines_copy, tiny_ckpt):
    from flf2v.models.config import get_preset
    p = engines_copy / "dit_b2.onnx"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(EngineError, match="dit_b2.onnx: missing or damaged"):
        OrtBackend(engines_copy, tiny_ckpt, get_preset("tiny"))
    (engines_copy / "manifest.json").unlink()
    with pytest.raises(EngineError, match="manifest.json missing"):
        OrtBackend(engines_copy, tiny_ckpt, get_preset("tiny"))


def test_external_data_outside_folder_is_refused(engines_copy, tmp_path):
    m = onnx.load(str(engines_copy / "clip.onnx"))
    t = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    t.data_location = onnx.TensorProto.EXTERNAL
    t.ClearField("raw_data")
    entry = t.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    onnx.save(m, str(engines_copy / "clip.onnx"))
    with pytest.raises(EngineError, match="points outside"):
        check_external_data(engines_copy / "clip.onnx", engines_copy, "run `flf2v-build ...`")


def test_manifest_for_another_preset(engines_copy, tiny_ckpt):
    from flf2v.models.config import get_preset
    m = json.loads((engines_copy / "manifest.json").read_text())
    m["model_preset"] = "small"
    (engines_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="built for small"):
        OrtBackend(engines_copy, tiny_ckpt, get_preset("tiny"))
