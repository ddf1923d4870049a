"""`flf2v-build`: engine folder and manifest, skipping current engines, partial files, bad input, the
folder lock; TensorRT builds compared with ONNX Runtime through polygraphy (gpu)."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
from conftest import shared_dir

from flf2v.export import build as B
from flf2v.export import contracts as C
from flf2v.export import manifest as M
from flf2v.models.config import get_preset

PRESET = get_preset("tiny")
NAMES = [g.name for g in C.graphs(PRESET, C.get_shape(PRESET, "tiny"), "fp32")]


@pytest.fixture(scope="module")
def folder(tiny_ckpt, tmp_path_factory):
    out = shared_dir(tmp_path_factory) / "engines-cpu"  # shared with test_export.py
    assert B.main(["--ckpt_dir", str(tiny_ckpt), "--preset", "tiny", "--out", str(out), "--cfg_batch", "both", "--quiet"]) == 0
    return out


def test_folder_and_manifest(folder, tiny_ckpt):
    m = json.loads((folder / "manifest.json").read_text())
    assert m["backend"] == "ort" and m["precision"] == "fp32" and m["model_preset"] == "tiny"
    assert m["target"] == M.target_tag("ort") and m["schema"] == M.SCHEMA
    assert m["shape"] == {"name": "tiny", "dynamic": False, "width": 64, "height": 64, "frame_num": 9,
                          "latent": [3, 8, 8]}
    assert m["checkpoint"]["fingerprint"] == M.checkpoint_fingerprint(tiny_ckpt)
    assert sorted(m["engines"]) == sorted(NAMES)
    graphs = {g.name: g for g in C.graphs(PRESET, C.get_shape(PRESET, "tiny"), "fp32")}
    for name, e in m["engines"].items():
        assert e["file"] == f"{name}.onnx" and (folder / e["file"]).stat().st_size == e["files"][e["file"]]
        data = folder / (e["onnx"] + ".data")  # the DiT is always streamed: its weights are external data
        assert e["onnx_sha256"] == B.file_sha256(folder / e["onnx"], *([data] if data.exists() else []))
        assert e["inputs"] == [s.to_json() for s in graphs[name].inputs]
        assert e["outputs"] == [s.to_json() for s in graphs[name].outputs]
        sess = ort.InferenceSession(str(folder / e["file"]), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == [s["name"] for s in e["inputs"]]
    assert M.target_tag("ort") == f"cpu-ort{ort.__version__}"
    key = M.build_key("tiny", "fp32", M.checkpoint_fingerprint(tiny_ckpt), [])
    assert key == f"tiny-fp32-{M.checkpoint_fingerprint(tiny_ckpt)[:8]}"
    assert M.default_folder("ort", "tiny", key=key).parts[-4:] == ("engines", f"cpu-ort{ort.__version__}", key, "tiny")


def test_second_run_skips_current_engines(folder, tiny_ckpt, capsys):
    # the manifest too: rewritten (a temporary file, then a rename) it raced test fixtures' copies of the folder
    before = {p.name: p.stat().st_mtime_ns for p in [*folder.glob("*.onnx"), folder / M.MANIFEST]}
    t0 = time.perf_counter()
    assert B.main(["--ckpt_dir", str(tiny_ckpt), "--preset", "tiny", "--out", str(folder)]) == 0
    assert time.perf_counter() - t0 < 10
    out, err = capsys.readouterr()  # no progress bar over nothing to build ("8/8 ... 172960.99graph/s")
    said = re.fullmatch(rf"{folder}: (\d+) engines current: 0 built now, \1 kept\n", out)
    assert said and "graph" not in err, (out, err)
    assert {p.name: p.stat().st_mtime_ns for p in [*folder.glob("*.onnx"), folder / M.MANIFEST]} == before


def test_partial_and_damaged_files_are_rebuilt(folder, tiny_ckpt, tmp_path):
    work = tmp_path / "engines"
    shutil.copytree(folder, work)
    # a killed export: its private temporary folder; a damaged graph; a graph renamed into place
    # but never recorded in the manifest
    (work / ".t5.partial-1234").mkdir()
    (work / ".t5.partial-1234" / "t5.onnx").write_bytes(b"half a graph")
    with open(work / "clip.onnx", "r+b") as f:
        f.truncate(1000)
    m = json.loads((work / "manifest.json").read_text())
    del m["engines"]["vae_encode_first"]
    (work / "manifest.json").write_text(json.dumps(m))
    untouched = (work / "dit_b1.onnx").stat().st_mtime_ns
    stale = (work / "vae_encode_first.onnx").stat().st_mtime_ns

    assert B.main(["--ckpt_dir", str(tiny_ckpt), "--preset", "tiny", "--out", str(work), "--quiet"]) == 0
    m = json.loads((work / "manifest.json").read_text())
    assert sorted(m["engines"]) == sorted(NAMES)
    assert not (work / ".t5.partial-1234").exists()
    assert (work / "clip.onnx").stat().st_size == m["engines"]["clip"]["files"]["clip.onnx"] > 1000
    assert (work / "vae_encode_first.onnx").stat().st_mtime_ns != stale
    assert (work / "dit_b1.onnx").stat().st_mtime_ns == untouched
    ort.InferenceSession(str(work / "clip.onnx"), providers=["CPUExecutionProvider"])


def test_force_rebuilds_a_damaged_file_of_the_right_size_and_keeps_the_rest(folder, tiny_ckpt, tmp_path, capsys):
    """A same-size damaged graph looks current (sizes are compared): the fix the run prints adds --force, which
    did nothing before ("8 engines current")."""
    work = tmp_path / "engines"
    shutil.copytree(folder, work)
    size = (work / "clip.onnx").stat().st_size
    (work / "clip.onnx").write_bytes(bytes(size))
    untouched = (work / "t5.onnx").stat().st_mtime_ns
    base = ["--ckpt_dir", str(tiny_ckpt), "--preset", "tiny", "--out", str(work), "--quiet"]
    assert B.main(base) == 0 and (work / "clip.onnx").read_bytes() == bytes(size)  # current by its size
    assert B.main(base + ["--force", "--graphs", "clip"]) == 0
    assert B.file_sha256(work / "clip.onnx") == B.file_sha256(folder / "clip.onnx")
    assert (work / "t5.onnx").stat().st_mtime_ns == untouched  # the graphs not asked for are kept
    assert sorted(json.loads((work / "manifest.json").read_text())["engines"]) == sorted(NAMES)


@pytest.mark.parametrize("err, fix", [(errno.ENOSPC, "; free space or choose another --out"),
                                      (errno.EROFS, "; choose another --out"), (errno.EACCES, "; choose another --out")])
def test_a_write_error_names_its_own_fix(tiny_ckpt, tmp_path, capsys, monkeypatch, err, fix):
    """A folder the user may not write to was told to "free space"."""
    def refuse(*a, **k):
        raise OSError(err, os.strerror(err), str(tmp_path / "e" / "t5.onnx"))

    monkeypatch.setattr(B, "build", refuse)
    assert B.main(["--ckpt_dir", str(tiny_ckpt), "--out", str(tmp_path / "e"), "--quiet"]) == 2
    line = capsys.readouterr().err.strip()
    assert line == f"flf2v-build: error: {os.strerror(err)} ({tmp_path / 'e' / 't5.onnx'}){fix}", line


@pytest.mark.parametrize("args, message", [
    (["--ckpt_dir", "/nonexistent/ckpt"], "no such directory"),
    (["--preset", "720p"], "unknown shape '720p' for tiny; choose one of dynamic, tiny, tiny-wide, tiny-tall or "
                           "<W>x<H>x<frames>"),
    (["--preset", "70x64x9"], "must be positive multiples of 16"),
    (["--preset", "1280x720x81"], "1280x720 is larger than any video tiny makes"),
    (["--precision", "bf16", "--backend", "ort"], "fp32 graphs only"),
    (["--graphs", "t5,unet"], "unknown graph 'unet'"),
    (["--graphs", ""], "unknown graph ''"),  # not "build them all"
    (["--out", ""], "--out is empty; give a folder or drop the flag"),  # built into the default folder
    (["--out", "{ckpt}/engines"], "--out {ckpt}/engines is inside the checkpoint folder {ckpt}"),
])
def test_bad_input_exits_2_with_one_line(tiny_ckpt, tmp_path, capsys, args, message):
    argv = ["--ckpt_dir", str(tiny_ckpt), "--out", str(tmp_path / "e"), "--quiet", *args]
    assert B.main([a.replace("{ckpt}", str(tiny_ckpt)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message.replace("{ckpt}", str(tiny_ckpt)) in err and err.count("\n") == 1, err
    assert not (tiny_ckpt / "engines").exists()


def test_a_checkpoint_folder_is_no_out(tiny_ckpt, tmp_path, capsys):
    """`--out CKPT` mixed a manifest and .onnx files with the weights (the API's own hint named that build)."""
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "c")
    before = sorted(p.name for p in ckpt.iterdir())
    assert B.main(["--ckpt_dir", str(ckpt), "--out", str(ckpt), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"flf2v-build: error: --out {ckpt} is a checkpoint folder; engines go in a folder of their own: " \
                  f"leave out --out (ENGINES=) or give another folder\n", err
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_the_default_folder_inside_the_checkpoint_is_refused(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """`cd CKPT && flf2v-build --ckpt_dir .`: the default engines/... folder is relative, so it lay among the
    weights."""
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "c")
    monkeypatch.chdir(ckpt)
    monkeypatch.setattr(B.Plan, "build_one", lambda *a: pytest.fail("an engine was built"))
    assert B.main(["--ckpt_dir", ".", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"is inside the checkpoint folder {ckpt}" in err and err.count("\n") == 1, err
    assert not (ckpt / "engines").exists()


@pytest.mark.parametrize("out", ["file", "checkpoint"])
def test_a_wrong_out_is_refused_before_the_checkpoint_is_read(tiny_ckpt, tmp_path, capsys, monkeypatch, out):
    """The checkpoint's settings and fingerprint take seconds (8-13 s on a small one under load)."""
    def read(*a, **k):
        raise AssertionError("the checkpoint was read before --out was checked")
    monkeypatch.setattr(B, "_settings", read)
    (tmp_path / "file").write_text("x")
    where = tmp_path / "file" if out == "file" else tiny_ckpt
    assert B.main(["--ckpt_dir", str(tiny_ckpt), "--out", str(where), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"flf2v-build: error: --out {where} is a ") and err.count("\n") == 1, err


@pytest.mark.skipif(M.trt_available(), reason="TensorRT is available here")
def test_trt_backend_without_tensorrt_exits_2(tiny_ckpt, tmp_path, capsys):
    assert B.main(["--ckpt_dir", str(tiny_ckpt), "--out", str(tmp_path), "--backend", "trt"]) == 2
    err = capsys.readouterr().err
    assert "needs TensorRT" in err and "pip install tensorrt-cu13" in err and err.count("\n") == 1, err


def test_auto_backend_with_a_gpu_but_no_tensorrt_refuses_cpu_engines(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """Never fp32 ONNX Runtime CPU engines of a 14B model on a GPU machine that lacks TensorRT."""
    monkeypatch.setattr(M, "trt_available", lambda: False)
    monkeypatch.setattr(M, "gpu_info", lambda: ("NVIDIA H100 80GB HBM3", (9, 0)))
    out = tmp_path / "e"
    assert B.main(["--ckpt_dir", str(tiny_ckpt), "--preset", "tiny", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "GPU is present but TensorRT" in err and "make setup" in err and err.count("\n") == 1, err
    assert not out.exists() or not any(out.iterdir())


def test_folder_lock_serialises(tmp_path):
    order = []

    def second():
        with B.folder_lock(tmp_path):
            order.append("second")

    with B.folder_lock(tmp_path):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        order.append("first done")
    t.join(5)
    assert order == ["first done", "second"]


def test_short_gpu_names():
    assert M.short_gpu_name("NVIDIA H100 80GB HBM3") == "h100"
    assert M.short_gpu_name("NVIDIA H200") == "h200"
    assert M.short_gpu_name("NVIDIA A100-SXM4-80GB") == "a100"
    assert M.short_gpu_name("NVIDIA GeForce RTX 4090") == "rtx4090"


# ---- TensorRT (gpu) --------------------------------------------------------------------------------

def _max_rel_errors(onnx_path, engine_path, feed) -> dict[str, float]:
    """Run an fp32 graph on ONNX Runtime and an engine on TensorRT through polygraphy's Comparator;
    max |trt - ort| / max |ort| per output."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator
    runners = [OnnxrtRunner(SessionFromOnnx(str(onnx_path))),
               TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))))]
    (_, ref), (_, got) = list(Comparator.run(runners, data_loader=[feed]).items())
    return {k: float(np.abs(np.asarray(got[0][k], np.float64) - ref[0][k]).max() / max(np.abs(ref[0][k]).max(), 1e-30))
            for k in ref[0].keys()}


@pytest.mark.gpu
def test_trt_fp32_engines_match_onnxruntime(tiny_ckpt, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT engines need the tensorrt package")
    pytest.importorskip("polygraphy", reason="the engines are built and compared through polygraphy")
    folder = B.build(tiny_ckpt, "tiny", precision="fp32", out=tmp_path / "trt32", backend="trt", cfg_batch=(1, 2),
                     progress=False)
    assert re.fullmatch(r"[a-z0-9]+-sm\d+-trt\d+\.\d+", M.target_tag("trt"))
    m = json.loads((folder / "manifest.json").read_text())
    assert sorted(m["engines"]) == sorted(NAMES) and (folder / "timing.cache").exists()
    for g in C.graphs(PRESET, C.get_shape(PRESET, "tiny"), "fp32"):
        feed = {s.name: x.numpy() for s, x in zip(g.inputs, C.sample_inputs(g, seed=1))}
        errs = _max_rel_errors(folder / f"{g.name}.onnx", folder / f"{g.name}.engine", feed)
        assert max(errs.values()) < 1e-3, (g.name, errs)


@pytest.mark.gpu
def test_trt_bf16_engines_match_fp32_onnxruntime(tiny_ckpt, tmp_path_factory):
    """bf16 engines (strongly typed) against the fp32 graphs on ONNX Runtime, within bf16 rounding. The
    VAE engines take bf16 caches, which ONNX Runtime's fp32 graphs cannot be fed: here they are only
    built (the fp32 engines above check the VAE numerics)."""
    pytest.importorskip("tensorrt", reason="TensorRT engines need the tensorrt package")
    pytest.importorskip("polygraphy", reason="the engines are built and compared through polygraphy")
    fp32 = B.build(tiny_ckpt, "tiny", out=shared_dir(tmp_path_factory) / "engines-cpu", backend="ort", cfg_batch=(1, 2),
                   progress=False)
    folder = B.build(tiny_ckpt, "tiny", precision="bf16", out=tmp_path_factory.mktemp("trt16"), backend="trt",
                     cfg_batch=(1, 2), progress=False)
    for g in C.graphs(PRESET, C.get_shape(PRESET, "tiny"), "bf16"):
        if g.component == "vae":
            continue
        feed = {s.name: x.numpy() for s, x in zip(g.inputs, C.sample_inputs(g, seed=1))}
        errs = _max_rel_errors(fp32 / f"{g.name}.onnx", folder / f"{g.name}.engine", feed)
        assert max(errs.values()) < 5e-2, (g.name, errs)


def test_graphs_flag_names_the_dit_layout_itself(tiny_ckpt, tmp_path):
    """--graphs dit_b1 builds dit_b1 although the default --cfg_batch is 2."""
    out = tmp_path / "e"
    assert B.main(["--ckpt_dir", str(tiny_ckpt), "--preset", "tiny", "--out", str(out), "--graphs", "dit_b1", "--quiet"]) == 0
    assert sorted(json.loads((out / "manifest.json").read_text())["engines"]) == ["dit_b1"]


def test_ctrl_c_inside_a_torch_context_manager_is_still_one_line_exit_130(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """A Ctrl-C landing in `with torch.device("meta")` surfaces as its cleanup's RuntimeError (seen in CI)."""
    def interrupted(*a, **k):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("trying to pop from empty mode stack")
    monkeypatch.setattr(B, "build", interrupted)
    assert B.main(["--ckpt_dir", str(tiny_ckpt), "--out", str(tmp_path / "e"), "--quiet"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("flf2v-build: error: interrupted;") and "\n" not in err, err
