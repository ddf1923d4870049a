"""Parts 6, 2, 3 and 1 of `make gpu-check`: the environment, the Triton attention kernels vs torch SDPA,
CUDA-graph capture of the denoising loop vs eager, and `pytest -m gpu`. Box-safe at import: stdlib only."""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from flf2v.bench.gpu_common import (ROOT, PartTimeout, Skip, check, dtype_of, errors, free_cuda, log, loop_inputs,
                                    model_preset, one_line, short_of, timed_call, timed_s, tokens_of, torch_denoiser,
                                    video_shapes)

# Modules whose presence decides what can run, and the distributions of those not named as they import
OPTIONAL = ("tensorrt", "polygraphy", "onnx", "onnxruntime", "onnxscript", "onnx_ir", "onnx_graphsurgeon", "av",
            "ftfy", "regex", "diffusers", "transformers", "PIL", "safetensors", "tokenizers", "sentencepiece",
            "einops", "tqdm", "pytest", "hypothesis", "numpy", "accelerate", "matplotlib", "cuda")
DIST = {"onnx_ir": "onnx-ir", "onnx_graphsurgeon": "onnx-graphsurgeon", "PIL": "pillow", "cuda": "cuda-python"}
PROJECT_MODULES = ("models.dit", "models.checkpoint", "models.make_tiny", "models.tokenizer", "runtime.denoise",
                   "runtime.torch_backend", "runtime.media", "runtime.pipeline", "runtime.engine_folders",
                   "runtime.backends", "runtime.engine_backend", "runtime.ort_backend", "runtime.trt_backend",
                   "runtime.cli", "kernels.ops", "kernels.trt_plugin", "export.contracts", "export.build",
                   "export.onnx_export", "export.plugins", "export.passes", "bench.cost", "bench.kernels", "bench.cli")
# Tools the compiled parts need beyond Python packages (on CUDA): Triton builds its kernel launcher with a C
# compiler against Python.h; AOTInductor compiles C++ and links the CUDA toolkit's runtime.
NEEDS = {"kernels": ("c_compiler", "python_h"), "quant": ("c_compiler", "python_h"),
         "aoti": ("c_compiler", "cxx_compiler", "python_h", "cuda_toolkit")}
FIX = {"c_compiler": "install gcc or set CC", "cxx_compiler": "install g++ or set CXX",
       "python_h": "install the Python headers (python3-dev)",
       "cuda_toolkit": "install the CUDA toolkit or set CUDA_HOME (nvcc)"}


def prerequisites() -> dict[str, str | None]:
    """Where each tool of NEEDS was found (None: absent)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and importlib.util.find_spec("torch") is not None:
        from torch.utils.cpp_extension import CUDA_HOME  # torch's own search: nvcc on PATH, /usr/local/cuda
        home = CUDA_HOME
    nvcc = shutil.which("nvcc") or (str(Path(home, "bin", "nvcc")) if home and Path(home, "bin", "nvcc").is_file()
                                    else None)
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return {"c_compiler": os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang"),
            "cxx_compiler": os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++"),
            "python_h": str(header) if header.is_file() else None,
            "cuda_toolkit": nvcc or (home if home and Path(home, "include", "cuda.h").is_file() else None)}


def missing_prerequisites(part: str, found: dict | None = None) -> str | None:
    """Why `part` cannot run here (one line naming each absent tool and its fix), or None."""
    found = found or prerequisites()
    return "; ".join(f"no {n.replace('_', ' ')}: {FIX[n]}" for n in NEEDS.get(part, ()) if not found[n]) or None


# ---- 6. environment ------------------------------------------------------------------------------------

def _version(mod: str) -> str | None:
    if importlib.util.find_spec(mod) is None:
        return None
    for dist in (DIST.get(mod, mod), mod):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    if mod == "tensorrt":  # installed as tensorrt_cu13 / tensorrt-cu12 etc.
        for dist in importlib.metadata.distributions():
            if (dist.metadata["Name"] or "").lower().startswith("tensorrt"):
                return f"{dist.version} ({dist.metadata['Name'].lower()})"
    return "present"


def _output(*cmd) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def part_environment(run, data: dict, part_end: float) -> None:
    import torch

    import flf2v
    try:
        import triton
    except ImportError as e:
        triton = None
        data["triton_error"] = one_line(e, 200)
    m = run.results["machine"]
    if run.cuda:
        props = torch.cuda.get_device_properties(0)
        smi = _output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
        m.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                 memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                 gpu_count=torch.cuda.device_count(), driver=smi.splitlines()[0].strip() if smi else None,
                 cuda_runtime=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        m.update(gpu=None, cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    git = _output("git", "-C", str(ROOT), "rev-parse", "HEAD")
    found = prerequisites()
    m.update(python=platform.python_version(), torch=torch.__version__, triton=getattr(triton, "__version__", None),
             triton_knobs=hasattr(triton, "knobs"), host=platform.node(), platform=platform.platform(),
             flf2v=str(Path(flf2v.__file__).parent), checkout=str(ROOT), git_commit=git,
             git_dirty=bool(_output("git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"))
             if git else None, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET"),
             c_compiler=found["c_compiler"],  # Triton builds its kernel launcher with it at the first launch
             CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES"))
    data["packages"] = {mod: _version(mod) for mod in OPTIONAL}
    data["missing"] = sorted(k for k, v in data["packages"].items() if v is None)
    data["project_imports_failing"] = broken = {}
    for mod in PROJECT_MODULES:  # which parts of the project import on this python
        try:
            importlib.import_module(f"flf2v.{mod}")
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            broken[mod] = one_line(e, 200)
    data["prerequisites"] = found
    if run.cuda and (skips := {part: why for part in NEEDS if (why := missing_prerequisites(part, found))}):
        data["warning"] = "; ".join(f"part {part} will be skipped ({why})" for part, why in skips.items())
    if data["packages"]["onnxruntime"]:
        with contextlib.suppress(Exception):
            import onnxruntime
            data["onnxruntime_providers"] = onnxruntime.get_available_providers()


# ---- 2. kernels ----------------------------------------------------------------------------------------

# max |a - b| / max |b| against fp64 on sampled query rows (tests/test_kernels.py uses the same bounds)
KERNEL_TOL = {"bfloat16": 1.6e-2, "float16": 2e-3, "float32": 1e-5}


def part_kernels(run, data: dict, part_end: float) -> None:
    from flf2v.bench import kernels as K
    preset = model_preset(run)
    cfg = preset.dit
    dtype, dtype_name = dtype_of(run)
    h, d = cfg.num_heads, cfg.head_dim
    data.update(heads=h, head_dim=d, dim=cfg.dim, dtype=dtype_name, text_tokens=cfg.text_len,
                image_tokens=cfg.clip_tokens, shapes={}, tolerance_vs_fp64=KERNEL_TOL[dtype_name])
    timing = dict(warmup_ms=25, rep_ms=300 if run.args.quick else 800, cpu_reps=0 if run.smoke else 1, oracle_n=256)
    shapes = video_shapes(run)[:1] if run.smoke else video_shapes(run)  # the interpreter is slow
    l_max = max(tokens_of(preset, s)[0] for s in shapes)

    def stopper(L):  # the kernels' rows need ~20 + 60 s (Triton, autotuning) or ~3 + 10 s at the largest L
        return lambda name: short_of(run, part_end, (20 + 60 * (L / l_max) ** 2) if name.startswith("triton")
                                     else (3 + 10 * (L / l_max) ** 2))

    problems = []
    for i, name in enumerate(shapes):
        L, latent, _ = tokens_of(preset, name)
        entry = data["shapes"][name] = {"tokens": L, "latent": list(latent)}
        show = lambda row, name=name: log(f"  [{name}] " + K.format_row(row).strip())  # noqa: E731
        log(f"kernels: {name}: self-attention B=1 L={L} H={h} D={d} {dtype_name}")
        entry["self"] = K.bench_self(1, L, h, d, dtype, run.device, fuse_k=(False,) if run.args.quick and i else
                                     (False, True), on_row=show, should_stop=stopper(L), **timing)
        free_cuda(run)
        log(f"kernels: {name}: cross-attention Lq={L} Lt={cfg.text_len} Li={cfg.clip_tokens}")
        entry["cross"] = K.bench_cross(1, L, cfg.text_len, cfg.clip_tokens, h, d, dtype, run.device, on_row=show,
                                       should_stop=stopper(L // 4), **timing)
        free_cuda(run)
        for kind in ("self", "cross"):
            for row in entry[kind]["rows"]:
                err, where = row.get("vs_fp64_rows", {}).get("max_rel"), f"{name} {kind} {row['name']}"
                if row["name"].startswith("triton") and err is not None and not err <= data["tolerance_vs_fp64"]:
                    problems.append(f"{where}: max rel err {err:.3g} vs fp64 > {data['tolerance_vs_fp64']:g}")
                if row.get("ms") is not None and not math.isfinite(row["ms"]):
                    problems.append(f"{where}: time {row['ms']}")
    check(problems)


# ---- 3. CUDA graph vs eager ----------------------------------------------------------------------------

GRAPH_TOL = {"float32": 1e-5, "bfloat16": 1e-2}  # max rel difference, captured vs eager


def _best_of(run, loop, x0, reps: int) -> tuple[float, list]:
    """Min seconds over `reps` runs of a loop from x0; the final x of each run."""
    best, outs = math.inf, []
    for i in range(reps):
        if i:  # reset as DenoiseLoop.capture restores it after its warm-up step
            loop.x.copy_(x0)
            loop._clear()
        best = min(best, timed_s(run, loop.run, 1)[0])
        outs.append(loop.x.clone())
    return best, outs


def _graph_case(run, case: dict, new_loop, x0, steps: int, reps: int) -> str | None:
    """One dtype / attention / CFG layout: eager against captured (a second eager run without CUDA)."""
    import torch
    with torch.no_grad():
        new_loop().run()  # warm-up: kernels chosen, allocator primed
        t_eager, (out_eager, *_) = _best_of(run, new_loop(), x0, reps)
        graph = new_loop()
        timed_call(run, case, "capture_s", graph.capture if run.cuda else lambda: None)
        t_graph, outs = _best_of(run, graph, x0, reps)
    e, same = errors(outs[0], out_eager), all(torch.equal(o, outs[0]) for o in outs)
    case.update(eager_step_ms=1e3 * t_eager / steps, graph_step_ms=1e3 * t_graph / steps,
                speedup=t_eager / t_graph if t_graph > 0 else None, max_abs=e["max_abs"], max_rel=e["max_rel"],
                tol=GRAPH_TOL[case["dtype"]], replays_identical=same, finite=bool(torch.isfinite(outs[0]).all()))
    log(f"cuda_graph: {case['dtype']} {case['attention']} cfg_batch={case['cfg_batch']}: eager "
        f"{case['eager_step_ms']:.3f} ms/step, {'graph' if run.cuda else 'eager again'} {case['graph_step_ms']:.3f} "
        f"ms/step, max rel diff {e['max_rel']:.2e}")
    if not (e["max_rel"] <= case["tol"]) or not case["finite"] or not same:
        return (f"{case['dtype']} cfg_batch={case['cfg_batch']}: max rel {e['max_rel']:.3g} (tol {case['tol']:g}), "
                f"finite={case['finite']}, replays identical={same}")
    return None


def part_cuda_graph(run, data: dict, part_end: float) -> None:
    import torch

    from flf2v.models.config import get_preset
    from flf2v.models.dit import WanDiT
    from flf2v.models.make_tiny import randomize_
    from flf2v.runtime.denoise import DenoiseLoop
    from flf2v.runtime.scheduler import make_sampler
    preset = get_preset("tiny")
    _, latent, _ = tokens_of(preset, "tiny")
    steps, reps = (3, 1) if run.smoke else (10, 5)
    data.update(preset="tiny", latent=list(latent), steps=steps, solver="unipc", shift=preset.sample_shift,
                guide_scale=preset.sample_guide_scale, captured=run.cuda, cases=[])
    if not run.cuda:
        data["note"] = "no CUDA: the 'graph' column is a second eager run (capture needs CUDA)"
    x0, context, clip, y = loop_inputs(preset.dit, latent, run.device)
    problems = []
    # the fused Triton attention inside the captured step too, on CUDA only: without capture its case is the sdpa
    # one's code, and in the smoke's interpreter it took 60 of the part's 80 s
    variants = [(torch.float32, "sdpa"), (torch.bfloat16, "sdpa")] + (
        [(torch.float32, "triton"), (torch.bfloat16, "triton")] if run.cuda else [])
    for dtype, attention in variants:
        dit = randomize_(WanDiT(preset.dit, attention=attention), torch.Generator().manual_seed(0))
        denoise = torch_denoiser(dit.eval().requires_grad_(False).to(run.device, dtype), dtype, run.device)
        for cfg_batch in (2, 1) if attention == "sdpa" else (2,):
            case = {"dtype": str(dtype)[6:], "cfg_batch": cfg_batch, "attention": attention}
            data["cases"].append(case)
            problems.append(_graph_case(run, case, lambda: DenoiseLoop(
                denoise, make_sampler("unipc", steps, preset.sample_shift), x0, context, clip, y,
                preset.sample_guide_scale, cfg_batch), x0, steps, reps))
        free_cuda(run)
    check(problems)


# ---- 1. pytest -m gpu ----------------------------------------------------------------------------------

def _missing_module(text: str) -> str | None:
    """The absent third-party package an error is about (ModuleNotFoundError), else None. A missing `flf2v.*`
    module, or one that is installed here, is a bug, not an absent package."""
    match = re.search(r"No module named '([A-Za-z0-9_.]+)'", text)
    top = match.group(1).split(".")[0] if match else "flf2v"
    return None if top == "flf2v" or importlib.util.find_spec(top) is not None else top


def _junit_counts(path: Path) -> dict:
    """Outcomes from pytest's junit XML. Failures and errors (collection errors included) caused by a package
    absent from this python are counted apart, as `not_run_missing_module`: skips for this machine (a bare GPU
    image lacks PIL, ftfy, diffusers, ...), not failures."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "not_run_missing_module": 0}
    failures, skips, missing = [], {}, {}
    for case in ET.parse(path).getroot().iter("testcase"):
        cls, name = case.get("classname") or "", case.get("name") or ""
        test = f"{cls}::{name}" if cls else name
        kinds = {child.tag: child for child in case if child.tag in ("failure", "error", "skipped")}
        tag = next((t for t in ("failure", "error") if t in kinds), None)
        if tag:
            msg, text = kinds[tag].get("message") or "", kinds[tag].text or ""
            if msg in ("collection failure", "") or len(msg) < 20:  # the cause is in the traceback text
                last = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")]
                msg = f"{msg}: {last[-1]}" if last else msg
            module = _missing_module(msg + "\n" + text)
            if module:
                counts["not_run_missing_module"] += 1
                missing.setdefault(module, []).append(test)
                continue
            counts["failed" if tag == "failure" else "errors"] += 1
            failures.append({"test": test, "kind": tag, "message": one_line(msg, 300)})
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = one_line(kinds["skipped"].get("message") or "", 160)
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skip_reasons": skips, "missing_modules": missing}


def _pytest(cmd: list[str], timeout: float) -> tuple[int, str, bool]:
    """(exit code, output, timed out): SIGINT at the timeout, so that pytest still writes its report."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, False
    except (subprocess.TimeoutExpired, PartTimeout):
        os.killpg(proc.pid, signal.SIGINT)  # the process group this part started
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        return proc.returncode, out, True


def part_pytest(run, data: dict, part_end: float) -> None:
    if importlib.util.find_spec("pytest") is None:
        raise Skip("pytest is not installed on this python")
    if not (ROOT / "tests").is_dir():
        raise Skip(f"no tests/ folder in {ROOT}")
    timeout = max(10.0, part_end - time.monotonic() - 20)  # 15 s left to interrupt pytest and read its report
    with tempfile.TemporaryDirectory(prefix="flf2v-gpu-check-pytest-") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={junit}", *(run.args.pytest_args or "").split()]
        data["command"] = " ".join(cmd[1:]).replace(str(junit), "<junit.xml>")
        log(f"pytest: {data['command']} (timeout {timeout:.0f} s)")
        rc, out, timed_out = _pytest(cmd, timeout)
        lines = [ln for ln in out.strip().splitlines() if ln.strip()]
        data.update(returncode=rc, output_tail=out[-3000:], summary_line=lines[-1] if lines else "")
        if junit.exists():
            data.update(_junit_counts(junit))
    if timed_out:  # the junit report counts the test running at the cut as passed: take pytest's own summary
        done = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", data["summary_line"])
        data["interrupted_summary"] = {k: int(n) for n, k in done}
        done = f"; before that: {', '.join(f'{n} {k}' for n, k in done)}" if done else ""
        check([f"pytest cut off by the time guard after {timeout:.0f} s{done}"])
    check([] if "passed" in data else [f"pytest exited {rc} without a report: {one_line(data['summary_line'])}"])
    if data["missing_modules"]:
        data["summary_note"] = (f"{data['passed']} passed, {data['skipped']} skipped; {data['not_run_missing_module']} "
                                f"not run for want of {', '.join(sorted(data['missing_modules']))} on this python")
    # exit 1 is pytest's "some tests failed": fine when every one of them only lacked an absent package
    if data["failed"] or data["errors"] or rc not in ((0, 1, 5) if data["missing_modules"] else (0, 5)):
        names = ", ".join(f["test"] for f in data["failures"][:8])
        check([f"{data['failed']} failed, {data['errors']} errors (exit {rc}): {names}"])
