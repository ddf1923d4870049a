"""`make gpu-check`: everything a GPU must prove, in one run of at most 8 minutes, with random weights.

The harness (README.md, `make gpu-check`): the parts (PARTS, in the order they run), the time guard, the results
(rewritten after every part) and the exit code. Box-safe: its modules import only the standard library at the
top (the GPU box has no PIL, ftfy, onnx_ir, diffusers, tensorrt, ...).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

from flf2v.bench.gpu_common import ROOT, CheckFailed, PartTimeout, Skip, free_cuda, log, one_line
from flf2v.bench.gpu_parts import missing_prerequisites, part_cuda_graph, part_environment, part_kernels, part_pytest
from flf2v.bench.gpu_parts_dit import part_dit_slice, part_offload, part_quant
from flf2v.bench.gpu_parts_engines import part_aoti, part_trt_tiny
from flf2v.bench.gpu_report import num, render_md
from flf2v.bench.report import free_stem

T_START = time.monotonic()  # the budget counts from here: torch's import is part of the 8 minutes
DEFAULT_OUT = ROOT / "bench" / "results"
BUDGET_S = 450.0  # with the watchdog's grace, 470 s: the whole check, torch's import included, under 8 minutes
WATCHDOG_GRACE_S = 20.0
MIN_PART_S = 5.0  # a part with less time than this left is skipped


class Part(NamedTuple):
    key: str
    number: int  # in the issue
    title: str
    fn: Callable  # fn(run, data, part_end)
    cap: float  # seconds at most
    plan: float  # seconds planned


# The plans add up to 435 s of the 450 s budget, the rest for torch's import (assumed ~15 s on the box:
# unmeasured) and slack; estimates until a window has run.
PARTS = (
    Part("environment", 6, "environment", part_environment, 60, 10),
    Part("kernels", 2, "Triton attention kernels vs torch SDPA", part_kernels, 250, 100),
    Part("cuda_graph", 3, "CUDA-graph capture and replay of the denoising step vs eager", part_cuda_graph, 60, 30),
    Part("dit_slice", 5, "full-width DiT slice (2 of 40 blocks of flf2v-14B, 720p / 81 frames)", part_dit_slice,
         150, 80),
    Part("trt_tiny", 4, "tiny TensorRT DiT engines vs the torch reference", part_trt_tiny, 150, 20),
    Part("aoti", 7, "AOTInductor packages: the DiT slice and the tiny model vs torch", part_aoti, 150, 90),
    Part("quant", 8, "8-bit at 720p: FP8 block linears and the sage attention kernel vs bf16", part_quant, 90, 25),
    Part("offload", 9, "DiT blocks streamed from pinned host memory vs resident (14B width, 720p)", part_offload,
         60, 20),
    Part("pytest", 1, "gpu-marked tests (pytest -m gpu)", part_pytest, 300, 60),
)
PART_FUNCS = {p.key: p.fn for p in PARTS}  # what run_part calls (tests replace entries)


class Run:
    """One gpu-check: its arguments, clock and deadline, and the results, written after every part."""

    def __init__(self, args, t0: float | None = None):  # t0: when the budget started (main: T_START)
        self.args, self.smoke, self.device, self.cuda = args, args.smoke, args.device, args.device == "cuda"
        self.t0 = time.monotonic() if t0 is None else t0
        self.deadline = self.t0 + args.budget
        self.lock = threading.Lock()
        self.paths: tuple[Path, Path] | None = None
        self.current: str | None = None
        self.results = {"schema": 1, "tool": "flf2v.bench.gpu_check",
                        "mode": "smoke (CPU, tiny shapes: the figures measure nothing)" if args.smoke else "gpu",
                        "quick": args.quick, "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                        "budget_s": args.budget, "seconds": None, "exit_code": None, "machine": {},
                        "parts": {p.key: {"number": p.number, "title": p.title, "status": "pending"} for p in PARTS}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def part(self, key: str) -> dict:
        return self.results["parts"][key]

    def save(self) -> None:
        if self.paths is None:
            return
        with self.lock:  # the watchdog may save while the main thread writes: retry a dict changed mid-copy
            for _ in range(5):
                with contextlib.suppress(RuntimeError):
                    res = json.loads(json.dumps(self.results, default=_jsonable))
                    break
                time.sleep(0.05)
            else:  # the last try raises
                res = json.loads(json.dumps(self.results, default=_jsonable))
        res["seconds"] = round(time.monotonic() - self.t0, 1)
        for path, text in zip(self.paths, (json.dumps(res, indent=2) + "\n", render_md(res))):
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)


def _jsonable(x):  # a Path, torch dtype or tensor a part recorded
    return x.tolist() if hasattr(x, "tolist") else str(x).removeprefix("torch.")


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise PartTimeout in the main thread after `seconds` (checked between Python bytecodes)."""
    def fire(signum, frame):
        raise PartTimeout(f"cut off by the time guard after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def watchdog(run: Run) -> None:
    """Last resort when the main thread is stuck inside one GPU call: write what we have and exit 1."""
    while time.monotonic() < run.deadline + WATCHDOG_GRACE_S:
        time.sleep(1.0)
        if run.results.get("exit_code") is not None:
            return
    key = run.current
    if key:
        run.part(key).update(status="failed", error=f"killed by the global time guard {WATCHDOG_GRACE_S:.0f} s past "
                                                    f"the {run.args.budget:.0f} s budget (stuck in one call)")
    run.results["exit_code"] = 1
    try:
        run.save()
    finally:
        print(f"gpu-check: error: global time guard: stuck in part {key!r} past the budget; partial results "
              f"written", file=sys.stderr, flush=True)
        os._exit(1)


def run_part(run: Run, key: str, cap: float, reserve_after: float) -> None:
    part = next(p for p in PARTS if p.key == key)
    p = run.part(key)
    p["planned_s"] = part.plan
    limit = min(cap, run.left() - reserve_after)
    if key not in run.args.parts:
        skip = "not selected (--parts)"
    elif run.smoke:  # a test of the code on a slow CPU: more time, no reserves (its budget defaults to an hour)
        limit, skip = 3 * cap, None
    elif limit < MIN_PART_S:
        skip = f"time budget: {run.left():.0f} s left of {run.args.budget:.0f} s"
    else:  # the smoke's interpreter compiles nothing: its tools are looked for on CUDA only
        skip = missing_prerequisites(key) if run.cuda else None
    if skip:
        p.update(status="skipped", reason=skip)
        return
    log(f"part {p['number']} ({key}): {p['title']} (planned {part.plan} s, up to {limit:.0f} s)")
    run.current, p["status"], data = key, "running", {}
    p["data"] = data
    t0 = time.monotonic()
    try:
        with alarm(limit):
            PART_FUNCS[key](run, data, t0 + limit)
        p["status"] = "ok"
        if data.get("summary_note"):
            p["note"] = data.pop("summary_note")
    except Skip as e:
        p.update(status="skipped", reason=one_line(str(e)))
    except CheckFailed as e:
        p.update(status="failed", error=one_line(str(e), 1500))
    except PartTimeout as e:  # out of time is not a failure of what it checked: what it measured stands
        p.update(status="partial", note=f"{e}; the figures measured before are kept")
    except Exception as e:  # noqa: BLE001 - a part's failure never stops the others
        p.update(status="failed", error=one_line(e, 1000), traceback=traceback.format_exc(limit=8)[-3000:])
    finally:
        p["seconds"] = round(time.monotonic() - t0, 1)
        run.current = None
        with contextlib.suppress(Exception):
            free_cuda(run)
    note = p.get("error") or p.get("reason") or p.get("note")
    log(f"part {p['number']} ({key}): {p['status']} in {p['seconds']:.1f} s of {part.plan} s planned"
        + (f": {note}" if note else ""))


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help=f"results folder (default: {DEFAULT_OUT})")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions; 480p kernels without the fuse_k=True row")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"global time budget in seconds (default {BUDGET_S:.0f})")
    ap.add_argument("--parts", default=",".join(PART_FUNCS),
                    help="comma-separated parts to run (default: all): " + ", ".join(PART_FUNCS))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pytest-args", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if unknown := [s for s in args.parts if s not in PART_FUNCS]:
        ap.exit(2, f"gpu-check: error: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PART_FUNCS)}\n")
    if not args.parts:  # ran nothing and exited 0, as if every part had passed
        ap.exit(2, f"gpu-check: error: --parts names no part; choose from {', '.join(PART_FUNCS)}\n")
    if args.budget is not None and not 0 < args.budget < math.inf:  # 0 or less skipped every part, exit 0
        ap.exit(2, f"gpu-check: error: --budget {args.budget:g} must be a positive, finite number of seconds "
                   f"(default {BUDGET_S:.0f})\n")
    if (args.device == "cpu") != args.smoke:
        ap.exit(2, "gpu-check: error: --smoke runs on --device cpu, and --device cpu is only for the --smoke test "
                   "of this tool\n")
    if args.budget is None:
        args.budget = 3600.0 if args.smoke else BUDGET_S
    if args.smoke and args.pytest_args is None:
        args.pytest_args = "tests/test_kernels.py"
    return args


def cuda_problem() -> str | None:
    """None when a CUDA GPU is usable, else why not (one line)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            ok = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception as e:  # noqa: BLE001
        return f"torch does not import on this python ({one_line(e, 200)})"
    if ok:
        return None
    why = "; ".join(one_line(str(w.message), 200) for w in caught if "cuda" in str(w.message).lower())
    build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
    return f"no CUDA GPU visible to {build}" + (f" ({why})" if why else "")


def _start(args) -> Run | None:
    """The device ready, the run and its results files named; None (after one line) without a usable GPU."""
    os.environ["TRITON_INTERPRET"] = "0" if args.device == "cuda" else "1"  # before flf2v.kernels is imported
    if args.device == "cuda" and (problem := cuda_problem()):
        print(f"gpu-check: error: {problem}; run it on a machine with an NVIDIA GPU (H100/H200 class)", file=sys.stderr)
        return None
    import torch
    if args.device == "cpu":  # one thread: tiny ops, and no OpenMP spinning against a busy machine's other work
        torch.set_num_threads(1)
    run = Run(args, T_START)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="flf2v-gpu-check-smoke-")) if args.smoke
                                           else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu-smoke"
    if args.device == "cuda":
        torch.cuda.init()
        from flf2v.export.manifest import short_gpu_name  # box-safe: torch and safetensors only
        tag = short_gpu_name(run.results["machine"].setdefault("gpu", torch.cuda.get_device_name(0)))
    base = free_stem(out, f"gpu-check-{tag}-{datetime.date.today().isoformat()}")  # as flf2v-bench's reports
    run.paths = (out / f"{base}.json", out / f"{base}.md")
    log(f"{'smoke run on the CPU' if args.smoke else run.results['machine']['gpu']}; budget {args.budget:.0f} s; "
        f"results -> {run.paths[0]} and .md")
    return run


def main(argv=None) -> int:
    run = _start(parse_args(argv))
    if run is None:
        return 2
    threading.Thread(target=watchdog, args=(run,), daemon=True).start()
    for i, part in enumerate(PARTS):
        run_part(run, part.key, part.cap, sum(p.plan for p in PARTS[i + 1:] if p.key in run.args.parts))
        run.save()
    run.results["exit_code"] = int(any(p["status"] == "failed" for p in run.results["parts"].values()))
    run.save()
    print(f"\ngpu-check summary ({run.results['machine'].get('gpu') or 'CPU smoke'}; "
          f"{time.monotonic() - run.t0:.0f} s of {run.args.budget:.0f} s):")
    for key, p in sorted(run.results["parts"].items(), key=lambda kv: kv[1]["number"]):
        note = p.get("error") or p.get("reason") or p.get("note") or ""
        print(f"  {p['number']}. {key:<12} {p['status']:<8} {num(p.get('seconds'), '{:6.1f}'):>6} s of "
              f"{p.get('planned_s', '-'):>3} s planned  {one_line(note, 150)}")
    print(f"results: {run.paths[0]}\n         {run.paths[1]}")
    return run.results["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
