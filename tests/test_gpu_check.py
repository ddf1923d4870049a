"""`make gpu-check` (bench/gpu_check.py) on a CPU: the no-GPU exit, the hidden smoke mode run through the
Makefile target's no-venv branch (the checkout imported as `flf2v` through a symlink on PYTHONPATH, as on a
bare GPU image), and a failing part giving exit code 1 with its results written."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"environment", "kernels", "cuda_graph", "dit_slice", "trt_tiny", "aoti", "quant", "offload", "pytest"}


def no_cuda_env(**extra) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **extra}
    env.pop("TRITON_INTERPRET", None)  # gpu_check sets it itself
    return env


def run_check(args, tmp_path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flf2v.bench.gpu_check", *args], cwd=tmp_path, env=no_cuda_env(),
                          capture_output=True, text=True, timeout=300, **kw)


def results(folder: Path) -> tuple[dict, str]:
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".md"), files
    assert files[0].startswith("gpu-check-cpu-smoke-"), files
    return json.loads((folder / files[0]).read_text()), (folder / files[1]).read_text()


def floats(x, path="$"):
    if isinstance(x, float):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from floats(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from floats(v, f"{path}[{i}]")


def test_no_gpu_one_line_exit_2_nothing_written(tmp_path):
    out = tmp_path / "results"
    r = run_check(["--out", str(out)], tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert r.stdout == "" and r.stderr.count("\n") == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("gpu-check: error: no CUDA GPU"), r.stderr
    assert not out.exists()


def make_gpu_check(tmp_path, python, args: str) -> subprocess.CompletedProcess:
    """`make gpu-check` with no venv: the checkout imported through the target's symlink."""
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    return subprocess.run(["make", "-s", "-C", str(ROOT), "gpu-check", f"VENV={tmp_path / 'no-venv'}",
                           f"GPU_PY={python}", f"GPU_CHECK_ARGS={args}"], env=no_cuda_env(), capture_output=True,
                          text=True, timeout=600)


def test_smoke_through_make_target_without_venv(tmp_path):
    """The TensorRT part (needs this venv's onnx tools; the box replica below runs every other part) via `make
    gpu-check` with no venv: the checkout must be imported through the target's symlink (not this venv's
    editable install)."""
    out = tmp_path / "results"
    r = make_gpu_check(tmp_path, sys.executable, f"--device cpu --smoke --parts environment,trt_tiny --out {out}")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res, md = results(out)
    assert res["exit_code"] == 0 and res["mode"].startswith("smoke")
    assert set(res["parts"]) == PARTS
    status = {k: part["status"] for k, part in res["parts"].items()}
    assert status.pop("environment") == status.pop("trt_tiny") == "ok" and set(status.values()) == {"skipped"}, status
    for path, x in floats(res):
        assert math.isfinite(x), path
    m = res["machine"]
    assert m["flf2v"].endswith("/flf2v") and not m["flf2v"].startswith(str(ROOT)), m["flf2v"]
    assert m["checkout"] == str(ROOT) and m["TRITON_INTERPRET"] == "1"
    p = {k: res["parts"][k]["data"] for k in ("environment", "trt_tiny")}
    assert p["environment"]["packages"]["torch" if "torch" in p["environment"]["packages"] else "numpy"]
    v, dyn = p["trt_tiny"]["variants"]
    assert v["shape"] == "tiny" and dyn["shape"] == "dynamic", p["trt_tiny"]["variants"]
    assert v["graphs"]["dit_b2"]["max_rel"] < 1e-4 and len(v["loops"]["cfg_batch=2"]["cosine_per_step"]) == 4
    assert v["min_cosine"] > 0.9999
    # the dynamic dit_b2 at a landscape and a portrait grid, one per optimization profile, vs torch
    grids = dyn["grids"]
    assert {n: (tuple(e["latent"]), e["profile"]) for n, e in grids.items()} == {
        "landscape": ((3, 6, 10), 0), "portrait": ((2, 10, 6), 1)}, grids
    assert grids["landscape"]["dims"] == {"T": 3, "hp": 3, "wp": 5}, grids
    assert all(e["max_rel"] <= dyn["tol_max_rel"] == 1e-3 for e in grids.values()), grids
    assert "error" not in dyn and dyn["max_rel"] < 1e-4 and dyn["build_s"] > 0, dyn
    assert "| fp32 | onnx | dynamic |" in md and "| portrait | 5 x 80 x 48 | 2 x 10 x 6 | 2 x 5 x 3 | 1 |" in md


CASES = """
import pytest

@pytest.mark.gpu
def test_passes():
    pass

@pytest.mark.gpu
def test_fails():
    assert 1 == 2, "deliberate"

@pytest.mark.gpu
def test_skips():
    pytest.skip("no such thing here")

def test_not_gpu_marked():
    raise AssertionError("deselected by -m gpu")
"""


def test_failing_part_exits_1_with_results_written(tmp_path):
    """Part 1 on a synthetic test folder: counts and failure names come from pytest's report, the part
    fails, the run exits 1 after writing both files; parts not selected are reported skipped."""
    tests = tmp_path / "synthetic"
    tests.mkdir()
    (tests / "conftest.py").write_text("def pytest_configure(config):\n"
                                       "    config.addinivalue_line('markers', 'gpu: needs CUDA')\n")
    (tests / "test_cases.py").write_text(textwrap.dedent(CASES))
    (tests / "test_broken.py").write_text("raise RuntimeError('broken at import')  # a collection error\n")
    (tests / "test_needs_absent.py").write_text("import flf2v_absent_package  # an absent package: not a failure\n")
    out = tmp_path / "results"
    r = run_check(["--device", "cpu", "--smoke", "--parts", "pytest", "--out", str(out), "--pytest-args", str(tests)],
                  tmp_path)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    res, md = results(out)
    assert res["exit_code"] == 1
    part = res["parts"]["pytest"]
    assert part["status"] == "failed" and "1 failed, 1 errors" in part["error"], part
    d = part["data"]
    assert (d["passed"], d["failed"], d["errors"], d["skipped"], d["not_run_missing_module"]) == (1, 1, 1, 1, 1), d
    assert list(d["missing_modules"]) == ["flf2v_absent_package"], d["missing_modules"]
    failed = {f["test"].rsplit("::", 1)[-1].rsplit(".", 1)[-1]: f for f in d["failures"]}
    assert set(failed) == {"test_fails", "test_broken"}, failed
    assert "deliberate" in failed["test_fails"]["message"] and "broken at import" in failed["test_broken"]["message"]
    assert d["skip_reasons"] == {"no such thing here": 1}
    assert all(p["status"] == "skipped" for k, p in res["parts"].items() if k != "pytest")
    assert "test_fails" in md and "failed" in md


def test_time_guard_cuts_a_slow_part_and_keeps_its_figures(monkeypatch):
    """In-process: a part past its limit is cut off by SIGALRM, reported partial (not failed: running out of
    time is not a failure of what it checked), its data kept, and the next part still runs."""
    import argparse
    import time

    from flf2v.bench import gpu_check as G

    def slow(run, data, part_end):
        data["measured"] = 1.5
        t = time.monotonic()
        while time.monotonic() - t < 60:  # Python-level work, as between GPU calls; ends if the guard fails
            time.sleep(0.01)

    def quick(run, data, part_end):
        data["measured"] = 2.5

    monkeypatch.setattr(G, "MIN_PART_S", 0.0)
    monkeypatch.setitem(G.PART_FUNCS, "kernels", slow)
    monkeypatch.setitem(G.PART_FUNCS, "cuda_graph", quick)
    args = argparse.Namespace(smoke=False, device="cpu", budget=60.0, quick=False, parts=["kernels", "cuda_graph"])
    run = G.Run(args)
    t0 = time.monotonic()
    G.run_part(run, "kernels", cap=0.3, reserve_after=0)
    G.run_part(run, "cuda_graph", cap=0.3, reserve_after=0)
    assert time.monotonic() - t0 < 30  # the guard cut both (0.6 s); without it, 60 s
    k, c = run.part("kernels"), run.part("cuda_graph")
    assert k["status"] == "partial" and "cut off by the time guard" in k["note"] and k["data"] == {"measured": 1.5}, k
    assert k["planned_s"] == dict((key, plan) for key, *_, plan in G.PARTS)["kernels"], k
    assert c["status"] == "ok" and c["data"] == {"measured": 2.5}, c
    G.run_part(run, "pytest", cap=0.3, reserve_after=0)
    assert run.part("pytest")["status"] == "skipped" and "not selected" in run.part("pytest")["reason"]
    run.deadline = time.monotonic() + 0.5  # the global budget nearly spent: the next part is skipped, not run
    monkeypatch.setattr(G, "MIN_PART_S", 1.0)
    G.run_part(run, "cuda_graph", cap=10, reserve_after=0)
    assert run.part("cuda_graph")["status"] == "skipped" and "time budget" in run.part("cuda_graph")["reason"]


BOX_PY = Path(sys.prefix) / "gpu-box" / "bin" / "python"  # `make setup`'s replica of the GPU box (CPU machines)


@pytest.mark.skipif(not BOX_PY.exists(), reason="no GPU-box replica venv (make setup builds it on CPU machines)")
def test_smoke_in_the_gpu_box_replica(tmp_path):
    """gpu-check's CPU smoke, every part's code end to end at tiny shapes, on the box's python (lock/gpu-box.txt:
    triton 3.6, onnxruntime 1.30, transformers 5.17; no tensorrt, polygraphy, PyAV, diffusers, ftfy) with the
    checkout through the make target's symlink: every part runs or says why not, as it must in the window."""
    out = tmp_path / "results"
    r = make_gpu_check(tmp_path, BOX_PY, f"--device cpu --smoke --out {out}")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res, md = results(out)
    assert res["exit_code"] == 0 and res["mode"].startswith("smoke") and set(res["parts"]) == PARTS
    status = {k: (p["status"], p.get("error") or p.get("reason")) for k, p in res["parts"].items()}
    assert status.pop("trt_tiny")[0] == "skipped", status  # no onnx_graphsurgeon / ftfy on the box
    assert all(s == "ok" for s, _ in status.values()), status
    missing = set(res["parts"]["environment"]["data"]["missing"])
    assert {"tensorrt", "polygraphy", "av", "diffusers", "ftfy"} <= missing, missing
    assert res["machine"]["triton"] == "3.6.0", res["machine"]
    for path, x in floats(res):
        assert math.isfinite(x), path
    p = {k: v["data"] for k, v in res["parts"].items()}
    s = p["aoti"]["dit_slice"]  # the AOTI package of the DiT slice against eager (fp32, CPU)
    assert s["compile_s"] > 0 and s["vs_eager"]["max_rel"] < 1e-4 and isinstance(s["kernels_in_package"], list), s
    assert p["aoti"]["dit_slice_triton"]["skipped"].startswith("smoke: the Triton kernels compile"), p["aoti"]
    assert p["environment"]["packages"]["torch" if "torch" in p["environment"]["packages"] else "numpy"]
    (shape, entry), = p["kernels"]["shapes"].items()
    assert entry["tokens"] == 3 * 4 * 4 and p["kernels"]["text_tokens"] == 512 and p["kernels"]["image_tokens"] == 514
    names = [row["name"] for row in entry["self"]["rows"] + entry["cross"]["rows"]]
    assert sum(n.startswith("triton") for n in names) == 3 and any("SDPA alone" in n for n in names), names
    for row in entry["self"]["rows"] + entry["cross"]["rows"]:
        assert row["ms"] > 0, row
        for key in ("vs_reference", "vs_fp64_rows"):
            if key in row:
                assert row[key]["max_rel"] < 1e-4, row  # fp32 in the interpreter
    cases = p["cuda_graph"]["cases"]
    want = {(d, b, "sdpa") for d in ("float32", "bfloat16") for b in (1, 2)}  # Triton in the step: CUDA only
    assert {(c["dtype"], c["cfg_batch"], c["attention"]) for c in cases} == want, cases
    assert all(c["max_rel"] == 0 and c["eager_step_ms"] > 0 for c in cases), cases
    sl = p["dit_slice"]
    assert sl["blocks"] == 2 and sl["floor_s"] > 0 and sl["triton_vs_sdpa"]["max_rel"] < 1e-4
    for name in ("torch eager (SDPA)", "torch + Triton kernels"):
        b = sl["backends"][name]
        assert b["block_s"] > 0 and b["video_denoise_s"] > 0 and b["vs_floor"] > 0, b
    assert "skipped" in sl["backends"]["TensorRT engine (bf16)"]
    assert p["pytest"]["returncode"] == 0 and p["pytest"]["skipped"] >= 1 and not p["pytest"]["failures"]
    o = p["offload"]  # every block streamed through the two slots, bit-identical to resident
    assert o["max_abs"] == 0 and o["block_bytes"] > 0 and o["device_block_bytes"] == 2 * o["block_bytes"], o
    for n in range(1, 10):
        assert f"\n## {n}. " in md, n
    assert "not a measurement" in md and "| part | status | seconds | planned | note |" in md
    assert "summary" in r.stdout and str(out) in r.stdout


def test_parts_without_their_tools_are_skipped_with_the_fix(monkeypatch):
    """On CUDA, AOTInductor without a C++ compiler or CUDA toolkit is skipped naming them and their fix, before
    it runs; a part whose tools are there runs."""
    import argparse

    from flf2v.bench import gpu_check as G
    from flf2v.bench import gpu_parts as P
    monkeypatch.setattr(P, "prerequisites", lambda: {"c_compiler": "/usr/bin/gcc", "cxx_compiler": None,
                                                     "python_h": "/usr/include/python3.11/Python.h",
                                                     "cuda_toolkit": None})
    ran = []
    monkeypatch.setitem(G.PART_FUNCS, "aoti", lambda run, data, end: ran.append("aoti"))
    monkeypatch.setitem(G.PART_FUNCS, "kernels", lambda run, data, end: ran.append("kernels"))
    run = G.Run(argparse.Namespace(smoke=False, device="cuda", budget=600.0, quick=False, parts=["aoti", "kernels"]))
    G.run_part(run, "aoti", cap=10, reserve_after=0)
    G.run_part(run, "kernels", cap=10, reserve_after=0)
    reason = run.part("aoti").get("reason", "")
    assert run.part("aoti")["status"] == "skipped" and "no cxx compiler" in reason and "CUDA_HOME" in reason, reason
    assert ran == ["kernels"] and run.part("kernels")["status"] == "ok"


def test_budget_counts_from_the_process_start(monkeypatch, tmp_path):
    """main's budget starts when gpu_check was imported, before torch's import, and the plan (with an assumed
    15 s for that import, unmeasured) and the watchdog's grace fit in 8 minutes."""
    import torch

    from flf2v.bench import gpu_check as G
    planned = sum(plan for *_, plan in G.PARTS)
    assert planned + 15 <= G.BUDGET_S and G.BUDGET_S + G.WATCHDOG_GRACE_S < 8 * 60, (planned, G.BUDGET_S)
    assert all(plan <= cap for *_, cap, plan in G.PARTS)
    seen = {}

    class Started(Exception):
        pass

    def run(args, t0=None):
        seen["t0"] = t0
        raise Started
    monkeypatch.setattr(G, "Run", run)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Started):
            G.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # main sets one thread for the smoke
    assert seen["t0"] == G.T_START


def test_gpu_check_imports_the_engine_folder_naming_on_a_bare_image():
    """Result files are named like the engine folders: export/manifest.py's short_gpu_name, which must
    import with only torch and safetensors (no onnx_ir, PIL, ftfy), as on the GPU test box."""
    code = ("import sys, builtins; real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] in ('onnx_ir', 'onnxscript', 'PIL', 'ftfy', 'onnx_graphsurgeon', 'av'):\n"
            "        raise ImportError(name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "from flf2v.export.manifest import short_gpu_name\n"
            "print(short_gpu_name('NVIDIA H100 80GB HBM3'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "h100", r.stderr[-2000:]



def test_engine_runner_drives_a_dynamic_tensorrt_context(monkeypatch, tmp_path):
    """The TensorRT side of EngineRunner, on a fake tensorrt (no GPU here): per grid, the profile is set
    before the input shapes, buffers of that grid's shapes are bound, and a repeated grid is not rebound."""
    import types

    import torch

    from flf2v.bench.gpu_parts_engines import EngineRunner
    calls = []

    class Ctx:
        def set_optimization_profile_async(self, index, stream):
            calls.append(("profile", index))
            return True

        def set_input_shape(self, name, shape):
            calls.append(("shape", name, tuple(shape)))
            return True

        def set_tensor_address(self, name, ptr):
            calls.append(("address", name))
            return True

        def execute_async_v3(self, stream):
            calls.append(("run",))
            return True

    engine = types.SimpleNamespace(num_optimization_profiles=2, create_execution_context=Ctx)
    runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda plan: engine)
    logger = lambda level: None  # noqa: E731 - trt.Logger(trt.Logger.WARNING)
    logger.WARNING = 0
    fake = types.SimpleNamespace(Logger=logger, Runtime=lambda log: runtime)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    (tmp_path / "e.engine").write_bytes(b"")
    x = {"name": "x", "shape": [2, 16, "T", "2*hp", "2*wp"], "dtype": "float32"}
    t = {"name": "t", "shape": [2], "dtype": "int64"}
    v = {"name": "v", "shape": [2, 16, "T", "2*hp", "2*wp"], "dtype": "float32"}
    runner = EngineRunner("trt", tmp_path / "e.engine", [x, t], [v], "cpu")
    assert runner.dynamic and not calls  # nothing bound before a grid is given
    with pytest.raises(ValueError):
        runner([torch.zeros(2, 16, 3, 6, 10), torch.zeros(2, dtype=torch.long)])
    for dims, profile in (({"T": 3, "hp": 3, "wp": 5}, 0), ({"T": 2, "hp": 5, "wp": 3}, 1)):
        calls.clear()
        feed = [torch.randn(2, 16, dims["T"], 2 * dims["hp"], 2 * dims["wp"]), torch.arange(2)]
        (out,) = runner(feed, dims, profile)
        assert out.shape == feed[0].shape and torch.equal(runner.bufs["x"], feed[0])
        assert calls == [("profile", profile), ("shape", "x", tuple(feed[0].shape)), ("address", "x"),
                         ("shape", "t", (2,)), ("address", "t"), ("address", "v"), ("run",)], calls
        calls.clear()
        runner(feed, dims, profile)
        assert calls == [("run",)], calls


def test_kernels_in_package_reads_names_and_code(tmp_path):
    """gpu-check part 7's evidence that AOTInductor compiled the flf2v kernels in: their names in the
    package's file names or generated code (a .pt2 is a zip)."""
    import zipfile

    from flf2v.bench.gpu_parts_engines import kernels_in
    path = tmp_path / "p.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("p/data/aotinductor/model/self_attn_fwd_kernel_0.cubin", b"\0\1")
        z.writestr("p/data/aotinductor/model/model.wrapper.cpp", "launch(cross_attn_fwd_kernel, grid);")
        z.writestr("p/data/weights/w0.bin", b"norm_rope: a weight file's bytes are not code")
        z.writestr("p/data/aotinductor/model/other.cpp", "cpp_fused_mul_0(...);")
    assert kernels_in(path) == ["cross_attn_fwd", "self_attn_fwd"]


def test_report_renders_each_part_and_a_rendering_bug_loses_only_that_part(monkeypatch):
    """The Markdown is made from each part's data alone; a part whose rendering raises says so in one line and
    the other parts' tables stay (the JSON is written beside it either way)."""
    from flf2v.bench import gpu_report as R
    res = {"mode": "smoke", "machine": {}, "started": "2026-12-06T21:00:00", "budget_s": 450.0, "parts": {
        "kernels": {"number": 2, "title": "kernels", "status": "ok",
                    "data": {"dtype": "float32", "rows": [{"name": "triton fused", "ms": 1.25}]}},
        "quant": {"number": 8, "title": "8-bit", "status": "ok", "data": {"tokens": 75600}}}}
    md = R.render_md(res)
    assert "| triton fused | 1.25 |" in md and "| tokens | 75600 |" in md, md
    real = R._part
    monkeypatch.setattr(R, "_part", lambda data: real(data) if "rows" in data else 1 / 0)
    md = R.render_md(res)
    assert "(could not render this part: ZeroDivisionError" in md and "| triton fused | 1.25 |" in md, md
    assert "## 8. 8-bit: ok" in md, md


@pytest.mark.parametrize("args, says", [
    (["--budget", "0"], "--budget 0 must be a positive, finite number of seconds"),
    (["--budget", "-5"], "--budget -5 must be a positive, finite number of seconds"),
    (["--budget", "nan"], "--budget nan must be a positive, finite number of seconds"),
    (["--budget", "inf"], "--budget inf must be a positive, finite number of seconds"),
    (["--parts", ","], "--parts names no part; choose from environment, "),
])
def test_a_budget_or_parts_that_can_run_nothing_is_refused(tmp_path, args, says):
    """Each skipped every part (or selected none) and exited 0, as if the GPU had passed."""
    out = tmp_path / "results"
    r = run_check(["--device", "cpu", "--smoke", "--parts", "environment", "--out", str(out), *args], tmp_path)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("gpu-check: error: ") and says in r.stderr, r.stderr
    assert not out.exists()


def test_a_second_run_of_the_day_keeps_the_first_results(tmp_path, monkeypatch):
    """The second run of a day overwrote gpu-check-<tag>-<date>.{json,md}; now -2, -3, ... as flf2v-bench."""
    import torch

    from flf2v.bench import gpu_check as G
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))  # _start sets it
    threads = torch.get_num_threads()
    try:
        names = []
        for _ in range(3):
            run = G._start(G.parse_args(["--device", "cpu", "--smoke", "--parts", "environment", "--out",
                                         str(tmp_path)]))
            run.save()
            names.append([p.name for p in run.paths])
    finally:
        torch.set_num_threads(threads)
    stem = names[0][0].removesuffix(".json")
    assert names == [[f"{s}.json", f"{s}.md"] for s in (stem, f"{stem}-2", f"{stem}-3")], names
    assert len(list(tmp_path.iterdir())) == 6
