"""`flf2v-bench`: time one video on every backend this machine has, against diffusers, in one process.

    flf2v-bench --preset tiny|small|720p [--out DIR] [--backends torch,ort,ort-dynamic,diffusers] [--repeats N]
                [--ckpt_dir DIR] [--work DIR]
    flf2v-bench --preset 720p --cost_only       (FLOPs, minimum bytes and H100/H200 floors; runs nothing)
    flf2v-bench export-memory --work DIR [...]   (peak RSS and time of the full-size DiT export)
    flf2v-bench fewstep [--preset small]         (50 steps + CFG vs 4 steps CFG-free; LoRA merge/swap cost)
    flf2v-bench cache [--preset small]           (step cache: MagCache / TeaCache vs off, time and PSNR/SSIM)
    flf2v-bench parallel [--preset tiny-4h]      (multi-process: comm cost model at 720p, measured overhead)

Writes `<preset>-<machine>-<date>.{json,md,png}` into --out. tiny and small run on random weights written
in the official layout (into --work, or a temporary folder); 720p needs a GPU and --ckpt_dir.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch

from flf2v.export.contracts import COMPUTE_DTYPE

from . import cost
from .measure import Stats, rss_bytes
from .report import cost_lines, machine_info, write_outputs
from .runners import BACKENDS, STAGES, DiffusersRunner, Job, OursRunner, Unavailable


@dataclasses.dataclass(frozen=True)
class BenchPreset:
    model: str
    size: str
    frames: int
    steps: int
    repeats: int
    warmup_steps: int | None = None  # None: the warm-up run is a full run
    gpu_only: bool = False


BENCH_PRESETS = {
    "tiny": BenchPreset("tiny", "64*64", 9, 4, repeats=3),
    "small": BenchPreset("small", "256*144", 17, 10, repeats=3),
    "720p": BenchPreset("flf2v-14B", "1280*720", 81, 50, repeats=1, warmup_steps=2, gpu_only=True),
}

PEER_NOTES = [
    "Peer: diffusers' WanImageToVideoPipeline with `last_image`, built by `flf2v.bench.diffusers_peer."
    "build_pipeline` on the same checkpoint (same weights, dtype, size, frames, steps, guidance, negative prompt "
    "and seed), its UniPC scheduler given the official sigmas (timesteps and sigmas equal ours).",
    "Differences in the work that cannot be removed: diffusers runs classifier-free guidance as two batch-1 "
    "transformer calls per step and the text encoder once per prompt (ours: one batch-2 call each); it resizes "
    "with PIL (CLIP: bicubic with antialiasing; VAE input: Lanczos) where ours uses torch bicubic, so its video "
    "differs slightly from ours; its output is post-processed to [0, 1] (`output_type='pt'`).",
    "Both sides are instrumented alike: one probe (time, peak memory) per stage, none inside the denoising loop; "
    "on the CPU the network calls are also timed with the host clock (for 'outside network'). Stages of ours are "
    "the pipeline's own; stages of diffusers are its network calls, and the denoise loop of both spans from the "
    "end of the VAE encode to the start of the VAE decode (loop setup, every step, the sampler; for diffusers "
    "also the latent normalisation and conditioning mask it builds after encoding). 'outside network' is end "
    "to end minus the time inside network calls (tokenizer, preprocessing, sampler, CFG, copies): CPU only.",
    "'1 step' is the denoise loop divided by the number of steps (both CFG passes and the sampler update).",
]


def _parse_backends(text: str) -> list[str]:
    names = [s for s in text.split(",") if s]
    for n in names:
        if n not in BACKENDS:  # argparse says it in one line, exit 2
            raise argparse.ArgumentTypeError(f"unknown backend {n!r}; choose from {', '.join(BACKENDS)}")
    return names


# Checkpoints and engines persist here between runs: flf2v-build skips current engines, so only the first
# run of a preset pays for its builds (minutes on 2 cores).
DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flf2v" / "bench"


def _checkpoint(bp: BenchPreset, args, work: Path) -> Path:
    if args.ckpt_dir:
        return Path(args.ckpt_dir)
    if bp.gpu_only:
        raise SystemExit(f"flf2v-bench: error: --preset {args.preset} needs --ckpt_dir (the real checkpoint)")
    from flf2v.models.make_tiny import write_tiny_checkpoint
    dest = work / f"ckpt-{bp.model}"
    if not (dest / "flf2v_tiny.json").exists():
        write_tiny_checkpoint(dest, bp.model, seed=0)
    return dest


def _load_avg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


BUSY_PER_CPU = 1.0  # 1-minute load average per CPU above which the machine counts as busy


def wait_for_idle(cpus: int, max_wait: float, per_cpu: float = BUSY_PER_CPU, poll: float = 5.0) -> dict:
    """Before timing anything: when the 1-minute load average is above `per_cpu` x `cpus`, wait (at most
    `max_wait` seconds) for it to drop. Returns what was seen, for the report."""
    limit = per_cpu * cpus
    first = last = _load_avg()
    t0 = time.monotonic()
    if first is not None and first[0] > limit:
        print(f"flf2v-bench: the machine is busy (1-minute load average {first[0]:.2f} on {cpus} CPUs); "
              + (f"waiting up to {max_wait:.0f} s for it to drop below {limit:.1f}" if max_wait > 0 else
                 "not waiting (--idle_wait 0)"), file=sys.stderr, flush=True)
        while last[0] > limit and time.monotonic() - t0 < max_wait:
            time.sleep(max(0.0, min(poll, max_wait - (time.monotonic() - t0))))
            last = _load_avg()
    busy = last is not None and last[0] > limit
    if busy:
        print(f"flf2v-bench: warning: still busy (load average {last[0]:.2f}); timing anyway, the report says so",
              file=sys.stderr, flush=True)
    return {"cpus": cpus, "busy_above": limit, "first_seen": first, "before": last,
            "waited_seconds": round(time.monotonic() - t0, 1) if first and first[0] > limit else 0.0,
            "busy_before": busy}


def compare_videos(runs: dict, reference: str = "torch") -> dict[str, dict]:
    """Per backend: the largest |difference| of its video from the reference backend's (same seed, settings;
    the last timed run of each), except for the reference itself, and between its own timed runs."""
    ref = runs[reference][0][-1].video if reference in runs else None
    out = {}
    for name, (timed, _) in runs.items():
        last = timed[-1].video
        entry = {"video_reference": reference if ref is not None else None,
                 "video_max_abs_diff": None if ref is None or name == reference
                 else (last - ref).abs().max().item(),
                 "video_run_to_run_max_abs_diff": max((r.video - timed[0].video).abs().max().item()
                                                      for r in timed[1:]) if len(timed) > 1 else None}
        out[name] = entry
    return out


def _steps(runner, job: Job, steps: int | None):
    runner.job = dataclasses.replace(job, steps=steps or job.steps)
    return runner


def warm_run(runner, job: Job, warmup_steps: int | None):
    """One untimed run with the warm-up step count; the runner's job is the timed one again afterwards."""
    try:
        return _steps(runner, job, warmup_steps).run()
    finally:
        _steps(runner, job, None)


def reload_and_warm(runner, job: Job, warmup_steps: int | None) -> tuple[dict, None]:
    """Load a runner again for the timed rounds, and warm it up (nothing of it is reported)."""
    runner.load()
    warm_run(runner, job, warmup_steps)
    return {}, None


def load_and_warm(runner, job: Job, warmup_steps: int | None) -> tuple[dict, object]:
    """Load and one warm-up run (reported, excluded from the timings). Returns (entry, warm-up result)."""
    entry = {"status": "ok", "rss_before_load": rss_bytes(), "load_avg_before": _load_avg()}
    t0 = time.perf_counter()
    runner.load()
    entry["load_seconds"] = time.perf_counter() - t0
    entry["engine_build_seconds"] = runner.build_seconds
    folder = getattr(runner, "folder", None)  # engines: the bytes of the folder (ONNX files, packages)
    entry["engine_bytes"] = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file()) if folder else None
    warm = warm_run(runner, job, warmup_steps)
    entry["warmup_seconds"] = warm.seconds
    return entry, warm


def summarize(entry: dict, runs: list, steps: int, memory_runs: list) -> dict:
    """Timings from `runs`; peak memory from `memory_runs` (the same runs, or the warm-up run when the
    timed runs had every backend loaded at once)."""
    stages = {k: Stats.of([r.stages[k] for r in runs]) for k in STAGES if all(k in r.stages for r in runs)}
    stages["denoise_step"] = Stats.of([r.stages["denoise"] / steps for r in runs])
    stages["end_to_end"] = Stats.of([r.seconds for r in runs])
    entry["stages"] = {k: v.to_json() for k, v in stages.items()}
    entry["host_peak"] = {k: max(r.host_peak.get(k, 0) for r in memory_runs) for k in STAGES}
    entry["host_peak"]["end_to_end"] = max(entry["host_peak"].values())
    cuda = [r.cuda_peak for r in memory_runs if any(v is not None for v in r.cuda_peak.values())]
    entry["cuda_peak"] = {k: max(c.get(k) or 0 for c in cuda) for k in STAGES} if cuda else {}
    if cuda:
        entry["cuda_peak"]["end_to_end"] = max(entry["cuda_peak"].values())
    if all(r.network_seconds is not None for r in runs):
        fractions = [(r.seconds - r.network_seconds) / r.seconds for r in runs]
        entry["outside_network_fraction"] = Stats.of(fractions).median
    return entry


def timed_run(runner) -> tuple[dict, object]:
    return {}, runner.run()


def _guard(name: str, fn):
    """fn() -> (entry, value); a backend that cannot run or fails gives its status, the others go on."""
    try:
        return fn()
    except Unavailable as e:
        return {"status": f"unavailable: {e}"}, None
    except Exception as e:
        traceback.print_exc()
        return {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}, None


def measure_sequential(runners: dict, job: Job, repeats: int, warmup_steps: int | None) -> tuple[dict, dict]:
    """One backend loaded at a time: load, warm up, `repeats` runs, close. Memory from the timed runs."""
    entries, runs = {}, {}
    for name, runner in runners.items():
        def go():
            entry, _ = load_and_warm(runner, job, warmup_steps)
            runs = [runner.run() for _ in range(repeats)]
            entry["load_avg_after"] = _load_avg()
            return entry, runs
        entries[name], runs[name] = _guard(name, go)
        runner.close()
        _progress(name, entries[name])
    return entries, {n: (r, r) for n, r in runs.items() if r}


def measure_interleaved(runners: dict, job: Job, repeats: int, warmup_steps: int | None) -> tuple[dict, dict]:
    """Memory: each backend alone (load, warm-up run, close). Time: all loaded, warmed up again, then
    `repeats` rounds of one run per backend, so that a slow spell of the machine hits every backend alike."""
    entries, warm = {}, {}
    for name, runner in runners.items():
        entries[name], warm[name] = _guard(name, partial(load_and_warm, runner, job, warmup_steps))
        runner.close()
    live = []
    for n in (n for n in runners if entries[n]["status"] == "ok"):
        entry, _ = _guard(n, partial(reload_and_warm, runners[n], job, warmup_steps))
        if entry.get("status"):
            entries[n] = entry
        else:
            live.append(n)
    runs = {n: [] for n in live}
    for _ in range(repeats):
        for n in list(live):
            _, res = _guard(n, partial(timed_run, runners[n]))
            if res is None:
                entries[n] = {"status": "failed during the timed rounds (see the log)"}
                live.remove(n)
                runners[n].close()
            else:
                runs[n].append(res)
    for n in live:
        entries[n]["load_avg_after"] = _load_avg()
        runners[n].close()
        _progress(n, entries[n])
    return entries, {n: (runs[n], [warm[n]]) for n in live}


def _progress(name: str, entry: dict) -> None:
    print(f"flf2v-bench: {name}: {entry['status']}", file=sys.stderr, flush=True)


def add_ratios(backends: dict, costs: dict, gpu_name: str | None) -> None:
    def med(b, k):
        return b["stages"].get(k, {}).get("median")

    for base in ("torch", "diffusers"):
        ref = backends.get(base)
        if not ref or ref["status"] != "ok":
            continue
        for name, b in backends.items():
            if b["status"] == "ok" and name != base:
                b.setdefault("speedup", {})[base] = {k: med(ref, k) / med(b, k) for k in ref["stages"]
                                                     if med(b, k)}
    if gpu_name:
        key = next((g for g in cost.GPUS if g in gpu_name.upper()), None)
        for b in backends.values():
            if b["status"] == "ok" and key:
                b["floor_fraction"] = {k: costs[k]["floor_s"][f"{key} bf16"] / med(b, k)
                                       for k in costs if med(b, k)}


def targets(result: dict) -> list[str]:
    """The project's targets, stated with what this run measured (CPU, `small`)."""
    b = result["backends"]
    out = []
    ort, dif = b.get("ort", {}), b.get("diffusers", {})
    if ort.get("status") == "ok":
        sp = ort.get("speedup", {})
        if "torch" in sp:
            out.append(f"ORT ≥ 1.5× torch eager end to end: {sp['torch']['end_to_end']:.2f}×")
        if "diffusers" in sp:
            out.append(f"ORT ≥ 2× diffusers: {sp['diffusers']['end_to_end']:.2f}×")
    elif ort:
        out.append(f"ORT targets not measured ({ort.get('status')})")
    dyn = b.get("ort-dynamic", {})
    if ort.get("status") == "ok" and dyn.get("status") == "ok":
        e2e = {n: b[n]["stages"]["end_to_end"]["median"] for n in ("ort", "ort-dynamic")}
        den = {n: b[n]["stages"]["denoise"]["median"] for n in ("ort", "ort-dynamic")}
        out.append(f"dynamic-shape engines within 5% of static ones: ort-dynamic / ort end to end "
                   f"{e2e['ort-dynamic'] / e2e['ort']:.3f}, denoise {den['ort-dynamic'] / den['ort']:.3f}")
    for name in ("torch", "ort"):
        if b.get(name, {}).get("outside_network_fraction") is not None:
            out.append(f"{name} runtime work outside the networks ≤ 2%: "
                       f"{100 * b[name]['outside_network_fraction']:.2f}%")
    if dif.get("status") == "ok" and "torch" in dif.get("speedup", {}):
        out.append(f"torch eager vs diffusers end to end: {1 / dif['speedup']['torch']['end_to_end']:.2f}×")
    return out


def run(args) -> dict:
    bp = BENCH_PRESETS[args.preset]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if bp.gpu_only and device.type != "cuda":
        raise SystemExit(f"flf2v-bench: error: --preset {args.preset} needs a CUDA GPU; use tiny or small here")
    dtype = COMPUTE_DTYPE[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    from flf2v.models.config import get_preset
    preset = get_preset(bp.model)
    width, height = (int(v) for v in bp.size.split("*"))
    steps = args.steps or bp.steps
    repeats = args.repeats or bp.repeats
    work_tmp = None if args.work else tempfile.TemporaryDirectory(prefix="flf2v-bench-")
    work = Path(args.work or work_tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        ckpt = _checkpoint(bp, args, work)
        job = Job(ckpt, preset, width, height, bp.frames, steps, preset.sample_shift, preset.sample_guide_scale)
        costs = cost.cost_table(preset, width, height, bp.frames, steps)
        machine = machine_info()
        load = wait_for_idle(machine["cpu"]["cpus"], args.idle_wait)
        result = {"preset": args.preset, "machine": machine, "costs_note": cost.__doc__.strip(),
                  "job": {"task": preset.dit.model_type, "model_preset": preset.name, "width": width, "height": height,
                          "frames": bp.frames, "steps": steps, "shift": preset.sample_shift,
                          "guide": preset.sample_guide_scale, "seed": job.seed, "prompt": job.prompt,
                          "dtype": str(dtype).removeprefix("torch."), "device": str(device), "repeats": repeats,
                          "warmup_steps": bp.warmup_steps or steps, "cfg_batch_ours": 2,
                          "negative_prompt": job.negative_prompt},
                  "cost": costs, "backends": {}, "notes": list(PEER_NOTES)}
        runners = {name: DiffusersRunner(job, device, dtype) if name == "diffusers"
                   else OursRunner(name, job, device, dtype, work / "engines") for name in args.backends}
        interleave = not bp.gpu_only if args.interleave is None else args.interleave
        measure = measure_interleaved if interleave else measure_sequential
        result["job"]["order"] = "interleaved" if interleave else "sequential"
        entries, runs = measure(runners, job, repeats, bp.warmup_steps)
        load["after"] = _load_avg()
        videos = compare_videos(runs)
        for name, entry in entries.items():
            if name in runs:
                timed, memory = runs[name]
                entry = summarize(entry, timed, steps, memory)
                entry.update(videos[name])
            result["backends"][name] = entry
        result["load"] = load
        if load["busy_before"]:
            result["notes"].append(
                f"The machine was busy: 1-minute load average {load['before'][0]:.1f} when the timing started "
                f"({load['cpus']} CPUs; waited {load['waited_seconds']:.0f} s for it to drop below "
                f"{load['busy_above']:.1f}). Other processes on the cores inflate every time and its spread, "
                f"torch's OpenMP-threaded small ops most (each parallel region waits for a descheduled thread); "
                f"compare only runs made on an idle machine.")
        add_ratios(result["backends"], costs, machine["gpu"]["name"] if machine["gpu"] else None)
        result["targets"] = targets(result)
        return result
    finally:
        if work_tmp is not None:
            work_tmp.cleanup()


def default_backends() -> list[str]:
    gpu = torch.cuda.is_available()
    return [b for b in BACKENDS if (gpu or b not in ("torch-triton", "trt", "trt-dynamic")) and b != "ort-numpy"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export-memory"]:
        from . import export_memory
        return export_memory.main(argv[1:])
    if argv[:1] == ["fewstep"]:
        from . import fewstep
        return fewstep.main(argv[1:])
    if argv[:1] == ["cache"]:
        from . import cache
        return cache.main(argv[1:])
    if argv[:1] == ["parallel"]:
        from . import parallel
        return parallel.main(argv[1:])
    ap = argparse.ArgumentParser(prog="flf2v-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True, choices=list(BENCH_PRESETS))
    ap.add_argument("--out", default="bench/results", help="folder for the JSON, Markdown and PNG")
    ap.add_argument("--backends", type=_parse_backends, default=None,
                    help=f"comma-separated subset of {','.join(BACKENDS)} (default: those this machine can run)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per backend (after one warm-up run)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    ap.add_argument("--ckpt_dir", default=None, help="checkpoint (default: random weights written into --work)")
    ap.add_argument("--work", default=str(DEFAULT_WORK),
                    help="checkpoints and engines, kept between runs (default: %(default)s; '' for a temporary "
                         "folder)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="default: bf16 on a GPU, fp32 on a CPU")
    ap.add_argument("--interleave", default=None, action=argparse.BooleanOptionalAction,
                    help="time the backends in rounds, all loaded at once (default: yes, except 720p)")
    ap.add_argument("--idle_wait", type=float, default=120.0,
                    help=f"seconds to wait, before timing, for the 1-minute load average to drop below "
                         f"{BUSY_PER_CPU:g} per CPU (0: do not wait); the load is reported either way")
    ap.add_argument("--cost_only", action="store_true", help="print the preset's cost model and floors, run nothing")
    args = ap.parse_args(argv)
    if args.cost_only:
        bp = BENCH_PRESETS[args.preset]
        from flf2v.models.config import get_preset
        w, h = (int(v) for v in bp.size.split("*"))
        steps = args.steps or bp.steps
        print(f"{args.preset}: {bp.model}, {w}x{h}, {bp.frames} frames, {steps} steps, CFG batch 2\n")
        print("\n".join(cost_lines(cost.cost_table(get_preset(bp.model), w, h, bp.frames, steps))))
        return 0
    args.backends = args.backends or default_backends()
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()  # the torchvision fallback notice of CLIPImageProcessor
    except ImportError:
        pass
    result = run(args)
    paths = write_outputs(result, Path(args.out))
    print(Path(paths["md"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
