"""Engine folders a user can live with: content fingerprints, one folder per shape side by side, the run
picking the folder that serves it (and saying so), rebuild hints that fix the problem as given."""
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flf2v.export import manifest as M
from flf2v.models import checkpoint as ck
from flf2v.runtime.choose import choose_engines
from flf2v.runtime.cli import main


def _shape(folder, name, w, h, f=9):
    m = json.loads((folder / M.MANIFEST).read_text())
    m["shape"] = {"name": name, "width": w, "height": h, "frame_num": f, "latent": [3, h // 8, w // 8]}
    (folder / M.MANIFEST).write_text(json.dumps(m))


@pytest.fixture()
def root(tiny_engines, tmp_path, monkeypatch):
    """engines/<this machine>/{tiny, tiny-wide} in a fresh working directory (tiny-wide: the tiny graphs
    relabelled, enough to test which folder is chosen)."""
    monkeypatch.chdir(tmp_path)
    r = M.target_root("ort")
    for name in ("tiny", "tiny-wide"):
        shutil.copytree(tiny_engines, r / name)
    _shape(r / "tiny-wide", "tiny-wide", 96, 64)
    return r


def _args(**kw):
    base = dict(backend="auto", engines=None, size=None, frame_num=None, ckpt_dir=None, quant="none")
    return SimpleNamespace(**{**base, **kw})


def test_fingerprint_is_of_content_not_file_times(tiny_ckpt, tmp_path):
    before = M.checkpoint_fingerprint(tiny_ckpt)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_ckpt, copy)  # new mtimes, new path
    for f in copy.rglob("*"):
        os.utime(f, (1, 1))
    assert M.checkpoint_fingerprint(copy) == before
    shard = sorted(copy.glob("diffusion_pytorch_model*.safetensors"))[0]
    with open(shard, "r+b") as f:  # one weight changed in the middle of the file
        f.seek(shard.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert M.checkpoint_fingerprint(copy) != before


def test_engines_survive_a_copied_checkpoint(tiny_engines, tiny_ckpt, tmp_path):
    from flf2v.runtime.engine_folders import read_manifest
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, copy)
    read_manifest(tiny_engines, copy, ck.preset_for(copy), "ort")  # no EngineError


@pytest.mark.parametrize("hw,shape", [((64, 64), "tiny"), ((64, 96), "tiny-wide"), ((480, 720), "tiny-wide")])
def test_auto_picks_the_folder_whose_grid_serves_the_first_frame(root, tiny_ckpt, hw, shape):
    preset = ck.preset_for(tiny_ckpt)
    kind, folder, note = choose_engines(_args(ckpt_dir=tiny_ckpt), preset, hw, torch.device("cpu"))
    assert (kind, folder, note) == ("ort", root / shape, None)


def test_auto_falls_back_to_torch_and_says_what_to_build(root, tiny_ckpt):
    preset = ck.preset_for(tiny_ckpt)
    kind, folder, note = choose_engines(_args(ckpt_dir=tiny_ckpt), preset, (96, 64), torch.device("cpu"))
    assert kind == "torch" and folder is None
    # the backend named: the build's auto would make TensorRT engines on a GPU where ORT's were meant
    assert "a 64x96 first frame" in note, note
    assert f"flf2v-build --ckpt_dir {tiny_ckpt} --preset dynamic --backend ort`" in note, note


def test_unservable_engines_name_the_build_that_serves(root, tiny_ckpt):
    preset = ck.preset_for(tiny_ckpt)
    args = _args(ckpt_dir=tiny_ckpt, engines=str(root / "tiny"))
    with pytest.raises(M.EngineError) as e:  # a tall first frame against the square folder
        choose_engines(args, preset, (96, 64), torch.device("cpu"))
    msg = str(e.value)
    # the same --engines would read the square folder again: the hint names the folder that holds both
    assert f"--preset dynamic --out {root / 'dynamic'} --backend ort`, then run with --engines {root}," in msg, msg
    assert "serves 64x64, 9 frames" in msg and "\n" not in msg
    # the folder the hint names holds the new one beside the old: a wide frame finds its own there
    args.engines = str(root)
    assert choose_engines(args, preset, (64, 96), torch.device("cpu"))[:2] == ("ort", root / "tiny-wide")


def test_the_static_build_hinted_for_an_odd_photo_serves_it(root, tiny_ckpt):
    """A photo out of every dynamic range gets the hint of a static build, sized at the model's default area;
    that folder's own W*H (no official size) then became the run's --size and was refused: the hint looped."""
    preset, cpu = ck.preset_for(tiny_ckpt), torch.device("cpu")
    args = _args(ckpt_dir=tiny_ckpt, engines=str(root))
    with pytest.raises(M.EngineError) as e:
        choose_engines(args, preset, (100, 1000), cpu)
    name = re.search(r"--preset (\S+) --out", str(e.value))[1]
    w, h, f = map(int, name.split("x"))
    assert f"{w}*{h}" not in preset.sizes and w > 8 * h, name
    shutil.copytree(root / "tiny", root / name)
    _shape(root / name, name, w, h, f)
    assert choose_engines(args, preset, (100, 1000), cpu)[:2] == ("ort", root / name)


@pytest.mark.parametrize("damage", [b"\0", b"\x08\x07\xff"])
def test_a_damaged_graph_of_the_right_size_is_one_line_and_passed_over_when_another_serves(root, tiny_ckpt, damage,
                                                                                          capsys, demo_frames):
    """A same-size damaged .onnx was a protobuf DecodeError traceback, even when another folder served the run."""
    bad = root.parent / "damaged" / "tiny"  # sorted before the good folders
    shutil.copytree(root / "tiny", bad)
    size = (bad / "vae_decode_chunk.onnx").stat().st_size
    (bad / "vae_decode_chunk.onnx").write_bytes((damage * size)[:size])
    args = ["--ckpt_dir", str(tiny_ckpt), "--first_frame", str(demo_frames[0]), "--last_frame", str(demo_frames[1]),
            "--prompt", "x", "--sample_steps", "1", "--quiet", "--save_file", "v.mp4", "--backend", "ort"]
    assert main(args + ["--engines", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flf2v-run: error: {bad / 'vae_decode_chunk.onnx'}: damaged engine file (DecodeError"), err
    assert err.endswith(f"--out {bad} --backend ort --force`") and len(err.splitlines()) == 1, err
    preset = ck.preset_for(tiny_ckpt)
    assert choose_engines(_args(ckpt_dir=tiny_ckpt, engines=str(root.parent)), preset, (64, 64),
                          torch.device("cpu"))[:2] == ("ort", root / "tiny")


def test_a_manifest_that_is_not_an_object_is_one_line(root, tiny_ckpt):
    """`[]` as manifest.json: AttributeError ('list' object has no attribute 'get') under --backend auto."""
    (root / "tiny" / M.MANIFEST).write_text("[]")
    assert M.load(root / "tiny") == {}
    # was "(KeyError('engines'))", naming a key instead of the damage
    with pytest.raises(M.EngineError, match=r"unreadable manifest \(not a JSON object: damaged\); run `flf2v-build "
                                            r"--ckpt_dir "):
        choose_engines(_args(ckpt_dir=tiny_ckpt, engines=str(root / "tiny")), ck.preset_for(tiny_ckpt), (64, 64),
                       torch.device("cpu"))


def test_another_backends_folder_names_the_build_for_the_backend_asked(root, tiny_ckpt):
    """The fix for "holds ort engines, not aoti" rebuilt the same ORT folder (it said "8 engines current")."""
    from flf2v.runtime.engine_folders import read_manifest
    with pytest.raises(M.EngineError) as e:
        read_manifest(root / "tiny", tiny_ckpt, ck.preset_for(tiny_ckpt), "aoti")
    msg = str(e.value)
    assert msg.startswith(f"{root / 'tiny'} holds ort engines, not aoti; pass --backend ort, or for aoti engines "
                          f"run `flf2v-build --ckpt_dir {tiny_ckpt} --preset tiny --precision fp32 --backend aoti` "
                          f"(runs without --engines find it)"), msg


def test_rebuild_hint_never_targets_another_checkpoints_folder(root, tiny_ckpt, tmp_path):
    """The fix builds the checkpoint's own folder (same shape and precision), leaving the other one's engines."""
    from flf2v.runtime.engine_folders import read_manifest
    other = tmp_path / "other-ckpt"
    shutil.copytree(tiny_ckpt, other)
    cfg = json.loads((other / ck.DIT_CONFIG).read_text())  # other weights or config: another checkpoint
    (other / ck.DIT_CONFIG).write_text(json.dumps({**cfg, "eps": 1e-5}))
    with pytest.raises(M.EngineError, match=rf"another checkpoint.*flf2v-build --ckpt_dir {other} --preset tiny-wide "
                                            rf"--precision fp32 --backend ort` \(runs without --engines find it\)"):
        read_manifest(root / "tiny-wide", other, ck.preset_for(other), "ort")


def test_cli_says_which_engines_run(root, tiny_ckpt, demo_frames, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    argv = ["--ckpt_dir", str(tiny_ckpt), "--first_frame", str(demo_frames[0]), "--last_frame", str(demo_frames[1]),
            "--prompt", "a red ball", "--frame_num", "9", "--sample_steps", "2", "--save_file", str(out), "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().out
    assert f"flf2v-run: backend ort, engines {root / 'tiny'} (fp32, 64x64, 9 frames)" in err, err
    assert out.exists()


@pytest.mark.parametrize("damage", [
    {"checkpoint": None}, {"engines": []}, {"shape": {"name": "tiny"}},
    {"engines": {"t5": {"file": "../../etc/passwd", "files": {}}}},
    {"engines": {"t5": {"file": "t5.onnx", "files": {"/abs/t5.onnx": 1}}}},
])
def test_damaged_or_hostile_manifest_is_one_line(root, tiny_ckpt, damage):
    from flf2v.runtime.engine_folders import read_manifest
    folder = root / "tiny"
    m = json.loads((folder / M.MANIFEST).read_text())
    (folder / M.MANIFEST).write_text(json.dumps({**m, **damage}))
    with pytest.raises(M.EngineError, match="unreadable manifest") as e:
        read_manifest(folder, tiny_ckpt, ck.preset_for(tiny_ckpt), "ort")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("gone", [("vae_decode_chunk",), ("dit_b1", "dit_b2", "vae_decode_chunk")])
def test_an_interrupted_build_names_every_graph_it_lacks(root, tiny_ckpt, gone):
    from flf2v.runtime.engine_folders import read_manifest
    folder = root / "tiny"
    m = json.loads((folder / M.MANIFEST).read_text())
    m["engines"] = {k: v for k, v in m["engines"].items() if k not in gone}
    (folder / M.MANIFEST).write_text(json.dumps(m))
    missing = "vae_decode_chunk" + (", the DiT" if len(gone) > 1 else "")
    with pytest.raises(M.EngineError, match=f"incomplete build \\(missing {missing}\\); ") as e:
        read_manifest(folder, tiny_ckpt, ck.preset_for(tiny_ckpt), "ort")
    assert "\n" not in str(e.value)


def test_engines_given_pick_their_backend(root, tiny_ckpt):
    """--engines with --backend auto runs those engines, whatever this machine would pick by itself."""
    preset = ck.preset_for(tiny_ckpt)
    args = _args(ckpt_dir=tiny_ckpt, engines=str(root / "tiny"))
    assert choose_engines(args, preset, (64, 64), torch.device("cpu"))[:2] == ("ort", root / "tiny")


def test_bf16_ort_engines_need_the_cuda_provider(root, tiny_ckpt):
    """bf16 ONNX Runtime engines (built with onnxruntime-gpu) are refused on the CPU provider in one line."""
    from flf2v.runtime.ort_backend import OrtBackend
    folder = root / "tiny"
    m = json.loads((folder / M.MANIFEST).read_text())
    (folder / M.MANIFEST).write_text(json.dumps({**m, "precision": "bf16"}))
    with pytest.raises(M.EngineError, match=r"run on the CUDA provider only.*--precision fp32") as e:
        OrtBackend(folder, tiny_ckpt, ck.preset_for(tiny_ckpt))
    assert "\n" not in str(e.value)


@pytest.fixture()
def other_ckpt(tmp_path_factory):
    """A second tiny checkpoint: same model, other weights."""
    from flf2v.models.make_tiny import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("other") / "ckpt", seed=1)


def test_no_folder_serving_gives_one_fix_not_each_folders_own(root, other_ckpt):
    """Only another checkpoint's folders here: the message carried their fix (a tiny build, which would not
    serve this frame) beside the run's own (the dynamic one), two commands in one line."""
    with pytest.raises(M.EngineError) as e:
        choose_engines(_args(ckpt_dir=other_ckpt, backend="ort"), ck.preset_for(other_ckpt), (128, 128),
                       torch.device("cpu"))
    msg = str(e.value)
    assert msg.count("flf2v-build") == 1 and "another checkpoint" in msg, msg
    assert msg.endswith(f"run `flf2v-build --ckpt_dir {other_ckpt} --preset dynamic --backend ort`, or use "
                        f"--backend torch"), msg


def test_two_checkpoints_never_share_a_default_folder(tiny_ckpt, other_ckpt, tmp_path, monkeypatch):
    """`make engines` of a second checkpoint leaves the first's engines where they were (the T5 graph alone:
    enough to place the folders, seconds to build)."""
    from flf2v.export.build import build
    monkeypatch.chdir(tmp_path)
    a = build(tiny_ckpt, "tiny", "fp32", only=["t5"], progress=False)
    a_files = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    b = build(other_ckpt, "tiny", "fp32", only=["t5"], progress=False)
    fingerprints = {M.load(f)["checkpoint"]["fingerprint"] for f in (a, b)}
    assert a != b and len(fingerprints) == 2, (a, b)
    assert {p.name: p.stat().st_mtime_ns for p in a.iterdir()} == a_files  # untouched
    assert a.parent.parent == b.parent.parent == M.target_root("ort") and a.name == b.name == "tiny"
    assert sorted(M.folders_under(M.target_root("ort"))) == sorted([a, b])
    assert sorted(M.folders_under("engines")) == sorted([a, b])  # `--engines engines`: the root of every target


def test_a_build_never_replaces_another_checkpoints_engines_unasked(tiny_ckpt, other_ckpt, tmp_path, capsys):
    from flf2v.export.build import main
    folder = tmp_path / "engines"
    assert main(["--ckpt_dir", str(tiny_ckpt), "--preset", "tiny", "--out", str(folder), "--graphs", "t5",
                 "--quiet"]) == 0
    def files():  # .lock is the build lock's, touched by every build
        return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != ".lock"}
    before = files()
    capsys.readouterr()
    args = ["--ckpt_dir", str(other_ckpt), "--preset", "tiny", "--out", str(folder), "--graphs", "t5", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "another build" in err and str(tiny_ckpt.resolve()) in err and "--force" in err, err
    assert len(err.splitlines()) == 1 and files() == before
    assert main(args + ["--force"]) == 0
    assert M.load(folder)["checkpoint"]["fingerprint"] == M.checkpoint_fingerprint(other_ckpt)


def test_runs_prefer_the_folder_with_their_loras_built_in(tiny_engines, tiny_ckpt, tmp_path):
    from flf2v.runtime.engine_folders import find_engines
    preset = ck.preset_for(tiny_ckpt)
    for name in ("a-none", "b-lora"):
        shutil.copytree(tiny_engines, tmp_path / name / "tiny")
    m = json.loads((tmp_path / "b-lora" / "tiny" / M.MANIFEST).read_text())
    m["loras"] = [{"path": "style.safetensors", "fingerprint": "f" * 16, "scale": 1.0}]
    (tmp_path / "b-lora" / "tiny" / M.MANIFEST).write_text(json.dumps(m))
    def serves(m):
        return True
    assert find_engines([tmp_path], tiny_ckpt, preset, "ort", serves)[0] == tmp_path / "a-none" / "tiny"
    got = find_engines([tmp_path], tiny_ckpt, preset, "ort", serves, prefer=lambda m: bool(m.get("loras")))[0]
    assert got == tmp_path / "b-lora" / "tiny"


@pytest.mark.parametrize("backend", ["aoti", "ort"])
def test_rebuild_hint_names_the_backend_of_the_run(tiny_ckpt, tmp_path, monkeypatch, backend):
    """--backend aoti with no packages serving the photo: the hint builds AOTInductor packages, not ORT."""
    monkeypatch.chdir(tmp_path)
    preset = ck.preset_for(tiny_ckpt)
    with pytest.raises(M.EngineError) as e:
        choose_engines(_args(ckpt_dir=tiny_ckpt, backend=backend), preset, (96, 64), torch.device("cpu"))
    assert ("--backend aoti" in str(e.value)) == (backend == "aoti"), str(e.value)
    assert f"flf2v-build --ckpt_dir {tiny_ckpt} " in str(e.value)


def test_cfg_parallel_needs_the_batch_1_dit(tiny_dynamic_engines, tiny_ckpt, tmp_path, monkeypatch):
    """`flf2v-build` builds the batch-2 DiT only: --cfg_parallel falls back to torch under auto (saying the
    command that builds what it needs) and names that command when a backend was asked for."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dynamic_engines, M.target_root("ort") / "dynamic")
    preset, cpu = ck.preset_for(tiny_ckpt), torch.device("cpu")
    assert choose_engines(_args(ckpt_dir=tiny_ckpt), preset, (64, 64), cpu)[0] == "ort"
    kind, folder, note = choose_engines(_args(ckpt_dir=tiny_ckpt, cfg_parallel=True), preset, (64, 64), cpu)
    assert (kind, folder) == ("torch", None) and "--cfg_batch both" in note, note
    with pytest.raises(M.EngineError, match="--cfg_batch both"):
        choose_engines(_args(ckpt_dir=tiny_ckpt, cfg_parallel=True, backend="ort"), preset, (64, 64), cpu)


def run_build_hint(text: str) -> None:
    """Runs the `flf2v-build ...` command a message gives, as the shell would pass its words."""
    import re
    import shlex

    from flf2v.export.build import main as build_main
    cmd = re.search(r"`flf2v-build ([^`]*)`", text)
    assert cmd, text
    assert build_main(shlex.split(cmd[1]) + ["--quiet"]) == 0


def test_flags_the_backend_does_not_use_are_said(root, tiny_ckpt):
    """--engines with --backend torch, and --dtype bf16 on fp32 engines, were dropped without a word."""
    preset, cpu = ck.preset_for(tiny_ckpt), torch.device("cpu")
    with pytest.warns(UserWarning, match=r"^--engines engines is not used: --backend torch runs the PyTorch ref"):
        assert choose_engines(_args(ckpt_dir=tiny_ckpt, backend="torch", engines="engines"), preset, (64, 64),
                              cpu)[0] == "torch"
    with pytest.warns(UserWarning, match=r"^--dtype bf16 is not used: engines run in the precision they were built "
                                         r"in \(fp32\); --backend torch runs bf16$"):
        assert choose_engines(_args(ckpt_dir=tiny_ckpt, dtype="bf16"), preset, (64, 64), cpu)[0] == "ort"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the engines' own precision, or none asked: nothing said
        for dtype in ("fp32", None):
            assert choose_engines(_args(ckpt_dir=tiny_ckpt, dtype=dtype), preset, (64, 64), cpu)[0] == "ort"


def test_another_checkpoints_folder_is_one_line_with_one_working_command(tiny_engines, other_ckpt, demo_frames,
                                                                         tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--ckpt_dir", str(other_ckpt), "--first_frame", str(demo_frames[0]), "--last_frame",
            str(demo_frames[1]), "--prompt", "a ball", "--sample_steps", "2", "--quiet", "--save_file",
            str(tmp_path / "v.mp4"), "--backend", "ort"]
    assert main(args + ["--engines", str(tiny_engines)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.count("flf2v-build") == 1, err
    assert err.startswith(f"flf2v-run: error: {tiny_engines} was built from another checkpoint"), err
    run_build_hint(err)  # as printed, from the same folder
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err
    assert "tiny-fp32-" in capsys.readouterr().out  # the new folder of its own ran


@pytest.mark.parametrize("command", ["build", "calibrate"])
def test_output_folders_checked_before_any_work(tiny_ckpt, tmp_path, capsys, command):
    """flf2v-build --out and flf2v-calibrate-cache --out under a file: one line, exit 2, nothing written."""
    (tmp_path / "file").write_text("not a folder")
    target = str(tmp_path / "file" / "out")
    if command == "build":
        from flf2v.export.build import main as run
        args = ["--ckpt_dir", str(tiny_ckpt), "--preset", "tiny", "--out", target, "--quiet"]
    else:
        from flf2v.runtime.calibrate_cache import main as run
        args = ["--ckpt_dir", str(tiny_ckpt), "--out", target, "--quiet"]
    assert run(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "file") in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _copy_as(src, dest, **fields):
    shutil.copytree(src, dest)
    m = json.loads((dest / M.MANIFEST).read_text())
    (dest / M.MANIFEST).write_text(json.dumps({**m, **fields}))
    return dest


def test_several_folders_the_choice_and_the_fix(tiny_engines, tiny_ckpt, tmp_path):
    """Found by a new user: with two static folders, an unset --frame_num took the first folder's by name (the
    video's length hung on folder names); a folder of --quant fp8 engines was said to serve another shape; the
    fix built into a folder holding another build (refused there, pointing at --force), or built when a folder
    beside the one given already served the run."""
    preset, cpu = ck.preset_for(tiny_ckpt), torch.device("cpu")
    shape = M.load(tiny_engines)["shape"]
    assert (shape["width"], shape["height"], shape["frame_num"]) == (64, 64, 9), shape  # the model's default
    long = {**shape, "name": "64x64x21", "frame_num": 21, "latent": [6, *shape["latent"][1:]]}
    a = _copy_as(tiny_engines, tmp_path / "static" / "a-21", shape=long)  # first by name
    b = _copy_as(tiny_engines, tmp_path / "static" / "b-9")
    for frames, want in ((None, b), (21, a), (9, b)):
        got = choose_engines(_args(ckpt_dir=tiny_ckpt, engines=str(tmp_path / "static"), frame_num=frames), preset,
                             (64, 64), cpu)[1]
        assert got == want, (frames, got)
    fp8 = _copy_as(tiny_engines, tmp_path / "q" / "fp8", quant="fp8")
    with pytest.raises(M.EngineError) as e:  # alone under its root: the fix builds, into a folder of its own
        choose_engines(_args(ckpt_dir=tiny_ckpt, engines=str(fp8)), preset, (64, 64), cpu)
    said = str(e.value)
    assert f"({fp8} holds --quant fp8 engines, which --quant fp8 runs)" in said, said
    out = re.search(r"--out (\S+)", said).group(1)
    assert not (Path(out) / M.MANIFEST).exists() and Path(out).parent == fp8.parent, said
    beside = _copy_as(tiny_engines, tmp_path / "q" / "tiny")
    with pytest.raises(M.EngineError) as e:
        choose_engines(_args(ckpt_dir=tiny_ckpt, engines=str(fp8)), preset, (64, 64), cpu)
    assert f"{beside} serves it: run with --engines {beside}," in str(e.value) and "flf2v-build" not in str(e.value)


# ---- a folder shared while builds write it ---------------------------------------------------------------------

def test_a_run_refuses_engine_files_rewritten_after_it_began(tiny_ckpt, tiny_engines, tmp_path):
    """A run opens graphs lazily (the VAE decoder after the loop): a flf2v-build --force into its folder meanwhile
    gave a video of two builds' engines, exit 0, or ONNX Runtime's traceback for a file being rebuilt."""
    from flf2v.runtime.backends import open_backend
    folder = shutil.copytree(tiny_engines, tmp_path / "engines")
    backend = open_backend("ort", folder, tiny_ckpt, ck.preset_for(tiny_ckpt), "cpu")
    backend.session("t5")  # files as they were: loaded
    decoder = folder / backend.specs["vae_decode_first"]["file"]
    shutil.copy(decoder, tmp_path / "new.onnx")  # the same bytes, written anew and renamed in, as a build does
    os.replace(tmp_path / "new.onnx", decoder)
    encoder = folder / backend.specs["vae_encode_first"]["file"]
    encoder.unlink()  # removed by a build that has just taken the folder
    for graph, name in (("vae_decode_first", decoder.name), ("vae_encode_first", encoder.name)):
        with pytest.raises(M.EngineError, match=f"{name} changed while this run used the folder"):
            backend.session(graph)


def test_a_current_folder_is_only_read_and_a_build_in_progress_is_named(tiny_ckpt, tiny_engines, tmp_path,
                                                                         monkeypatch):
    """A build into a current folder took its lock (a write) first: a read-only share of engines failed; a run
    meeting a folder mid-build was told to run the build it would only wait for."""
    import fcntl

    from flf2v.export import build as B
    folder = shutil.copytree(tiny_engines, tmp_path / "engines")
    monkeypatch.setattr(B, "folder_lock", lambda f: pytest.fail("a current folder was locked (written)"))
    built = []
    for ckpt in (tiny_ckpt, shutil.copytree(tiny_ckpt, tmp_path / "copy")):  # a copy: the manifest names the other
        assert B.build(ckpt, "tiny", "fp32", out=folder, backend="ort", cfg_batch=(1, 2), progress=False,
                       built=built) == folder and built == []
    first = next(iter(M.load(folder)["engines"].values()))["files"]
    (folder / next(iter(first))).unlink()
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as folder_lock holds it while building
        with pytest.raises(M.EngineError, match="a flf2v-build into this folder is running now"):
            M.validate(folder, tiny_ckpt, ck.preset_for(tiny_ckpt), "ort")
    with pytest.raises(M.EngineError, match="missing or damaged engine file .*; .*flf2v-build"):
        M.validate(folder, tiny_ckpt, ck.preset_for(tiny_ckpt), "ort")
