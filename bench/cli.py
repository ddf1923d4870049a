"""`flf2v-bench`: time one video on every backend this machine has, against diffusers, in one process.

    flf2v-bench --preset tiny|small|720p [--out DIR] [--backends torch,ort,diffusers] [--repeats N]
                [--ckpt_dir DIR] [--work DIR]
    flf2v-bench --preset 720p --cost_only       (FLOPs, minimum bytes and H100/H200 floors; runs nothing)
    flf2v-bench export-memory --work DIR [...]   (peak RSS and time of the full-size DiT export)

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
from pathlib import Path

import torch

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
    "Peer: diffusers' WanImageToVideoPipeline with `last_image`, built by `flf2v.models.diffusers_format."
    "build_pipeline` on the same checkpoint (same weights, dtype, size, frames, steps, guidance, negative prompt "
    "and seed), its UniPC scheduler given the official sigmas (timesteps and sigmas equal ours).",
    "Differences in the work that cannot be removed: diffusers runs classifier-free guidance as two batch-1 "
    "transformer calls per step and the text encoder once per prompt (ours: one batch-2 call each); it resizes "
    "with PIL (CLIP: bicubic with antialiasing; VAE input: Lanczos) where ours uses torch bicubic, so its video "
    "differs slightly from ours; its output is post-processed to [0, 1] (`output_type='pt'`).",
    "Stages of ours are the pipeline's own stages; stages of diffusers are its network calls, its denoise loop "
    "spans the first transformer call to the end of the last scheduler step. 'outside network' is end to end "
    "minus the time inside network calls (tokenizer, preprocessing, sampler, CFG, copies): CPU only.",
    "'1 step' is the denoise loop divided by the number of steps (both CFG passes and the sampler update).",
]


def _parse_backends(text: str) -> list[str]:
    names = [s for s in text.split(",") if s]
    for n in names:
        if n not in BACKENDS:
            raise SystemExit(f"flf2v-bench: error: unknown backend {n!r}; choose from {', '.join(BACKENDS)}")
    return names


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


def _steps(runner, job: Job, steps: int | None):
    runner.job = dataclasses.replace(job, steps=steps or job.steps)
    return runner


def load_and_warm(runner, job: Job, warmup_steps: int | None) -> tuple[dict, object]:
    """Load and one warm-up run (reported, excluded from the timings). Returns (entry, warm-up result)."""
    entry = {"status": "ok", "rss_before_load": rss_bytes(), "load_avg_before": _load_avg()}
    t0 = time.perf_counter()
    runner.load()
    entry["load_seconds"] = time.perf_counter() - t0
    entry["engine_build_seconds"] = runner.build_seconds
    warm = _steps(runner, job, warmup_steps).run()
    entry["warmup_seconds"] = warm.seconds
    _steps(runner, job, None)
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
            return entry, [runner.run() for _ in range(repeats)]
        entries[name], runs[name] = _guard(name, go)
        runner.close()
        _progress(name, entries[name])
    return entries, {n: (r, r) for n, r in runs.items() if r}


def measure_interleaved(runners: dict, job: Job, repeats: int, warmup_steps: int | None) -> tuple[dict, dict]:
    """Memory: each backend alone (load, warm-up run, close). Time: all loaded, warmed up again, then
    `repeats` rounds of one run per backend, so that a slow spell of the machine hits every backend alike."""
    entries, warm = {}, {}
    for name, runner in runners.items():
        entries[name], warm[name] = _guard(name, lambda: load_and_warm(runner, job, warmup_steps))
        runner.close()
    live = []
    for n in (n for n in runners if entries[n]["status"] == "ok"):
        entry, _ = _guard(n, lambda: ({}, (runners[n].load(), _steps(runners[n], job, warmup_steps).run())))
        _steps(runners[n], job, None)
        if entry.get("status"):
            entries[n] = entry
        else:
            live.append(n)
    runs = {n: [] for n in live}
    for _ in range(repeats):
        for n in list(live):
            _, res = _guard(n, lambda: ({}, runners[n].run()))
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
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    from flf2v.models.config import get_preset
    preset = get_preset(bp.model)
    width, height = (int(v) for v in bp.size.split("*"))
    steps = args.steps or bp.steps
    repeats = args.repeats or bp.repeats
    work_tmp = None if args.work else tempfile.TemporaryDirectory(prefix="flf2v-bench-")
    work = Path(args.work or work_tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    load_at_start = _load_avg()
    try:
        ckpt = _checkpoint(bp, args, work)
        job = Job(ckpt, preset, width, height, bp.frames, steps, preset.sample_shift, preset.sample_guide_scale)
        costs = cost.cost_table(preset, width, height, bp.frames, steps)
        machine = machine_info()
        result = {"preset": args.preset, "machine": machine, "costs_note": cost.__doc__.strip(),
                  "job": {"task": preset.dit.model_type, "model_preset": preset.name, "width": width, "height": height,
                          "frames": bp.frames, "steps": steps, "shift": preset.sample_shift,
                          "guide": preset.sample_guide_scale, "seed": job.seed, "prompt": job.prompt,
                          "dtype": str(dtype).removeprefix("torch."), "device": str(device), "repeats": repeats,
                          "warmup_steps": bp.warmup_steps or steps, "cfg_batch_ours": 2},
                  "cost": costs, "backends": {}, "notes": list(PEER_NOTES)}
        runners = {name: DiffusersRunner(job, device, dtype) if name == "diffusers"
                   else OursRunner(name, job, device, dtype, work / "engines") for name in args.backends}
        interleave = not bp.gpu_only if args.interleave is None else args.interleave
        measure = measure_interleaved if interleave else measure_sequential
        result["job"]["order"] = "interleaved" if interleave else "sequential"
        entries, runs = measure(runners, job, repeats, bp.warmup_steps)
        reference = runs["torch"][0][-1].video if "torch" in runs else None
        for name, entry in entries.items():
            if name in runs:
                timed, memory = runs[name]
                entry = summarize(entry, timed, steps, memory)
                if reference is not None:
                    entry["video_max_abs_diff"] = (timed[-1].video - reference).abs().max().item()
            result["backends"][name] = entry
        result["load_avg_at_start"] = load_at_start
        if load_at_start and load_at_start[0] > 0.5:
            result["notes"].append(
                f"The machine was not idle: 1-minute load average {load_at_start[0]:.1f} when the run started "
                f"({machine['cpu']['cpus']} CPUs). Other processes on the cores inflate every time and its spread, "
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
    return [b for b in BACKENDS if gpu or b not in ("torch-triton", "trt")]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export-memory"]:
        from . import export_memory
        return export_memory.main(argv[1:])
    ap = argparse.ArgumentParser(prog="flf2v-bench", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", required=True, choices=list(BENCH_PRESETS))
    ap.add_argument("--out", default="bench/results", help="folder for the JSON, Markdown and PNG")
    ap.add_argument("--backends", type=_parse_backends, default=None,
                    help=f"comma-separated subset of {','.join(BACKENDS)} (default: those this machine can run)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per backend (after one warm-up run)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    ap.add_argument("--ckpt_dir", default=None, help="checkpoint (default: random weights written into --work)")
    ap.add_argument("--work", default=None, help="keep checkpoints and engines here between runs")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="default: bf16 on a GPU, fp32 on a CPU")
    ap.add_argument("--interleave", default=None, action=argparse.BooleanOptionalAction,
                    help="time the backends in rounds, all loaded at once (default: yes, except 720p)")
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
