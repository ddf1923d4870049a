"""The headline stage comparison, `flf2v-bench --preset tiny|small|720p`: one video on every backend this machine
has and on diffusers' peer pipeline, in one process: time and peak memory per stage, the video against the
torch reference, ratios, and the cost model's floors (`--cost_only`: those alone, nothing run)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
from pathlib import Path

import torch

from flf2v.models.config import get_preset

from . import cost
from .measure import BadInput, gemm_roof, load_avg, rss_bytes, stats, timed
from .report import GiB, STAGE_LABELS, Report, num, table
from .runners import BACKENDS, GPU_ONLY, STAGES, DiffusersRunner, Job, OursRunner, Unavailable

log = logging.getLogger("flf2v.bench")


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
    "Peer: diffusers' WanImageToVideoPipeline with `last_image`, built by `flf2v.bench.diffusers_peer.build_pipeline` "
    "on the same checkpoint (same weights, dtype, size, frames, steps, guidance, negative prompt and seed), its UniPC "
    "scheduler given the official sigmas (timesteps and sigmas equal ours).",
    "Differences in the work that cannot be removed: diffusers runs CFG as two batch-1 transformer calls per step and "
    "the text encoder once per prompt (ours: one batch-2 call each); it resizes with PIL (CLIP: bicubic with "
    "antialiasing; VAE input: Lanczos) where ours uses torch bicubic, so its video differs slightly from ours.",
    "Both sides are instrumented alike: one probe (time, peak memory) per stage, none inside the denoising loop. "
    "Stages of ours are the pipeline's own, those of diffusers its network calls; the denoise loop of both spans "
    "from the end of the VAE encode to the start of the VAE decode (for diffusers also its latent normalisation "
    "and conditioning mask). 'outside network' (CPU only) is end to end minus the time inside network calls "
    "(tokenizer, preprocessing, sampler, CFG, copies); '1 step' is the denoise loop over the steps.",
]


def parse_backends(text: str) -> list[str]:
    names = [s for s in text.split(",") if s]
    if not names:  # an empty list ran the whole default set (minutes of engine builds)
        raise argparse.ArgumentTypeError(f"name at least one backend (choose from {', '.join(BACKENDS)})")
    for n in names:
        if n not in BACKENDS:  # argparse says it in one line, exit 2
            raise argparse.ArgumentTypeError(f"unknown backend {n!r}; choose from {', '.join(BACKENDS)}")
    return names


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", required=True, choices=list(BENCH_PRESETS))
    ap.add_argument("--backends", type=parse_backends, default=None,
                    help=f"comma-separated subset of {','.join(BACKENDS)} (default: those this machine can run)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per backend (after one warm-up run)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    ap.add_argument("--ckpt_dir", default=None, help="checkpoint (default: random weights written into --work)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="default: bf16 on a GPU, fp32 on a CPU")
    ap.add_argument("--interleave", default=None, action=argparse.BooleanOptionalAction,
                    help="time the backends in rounds, all loaded at once (default: yes, except 720p)")
    ap.add_argument("--cost_only", action="store_true", help="print the preset's cost model and floors, run nothing")


def default_backends() -> list[str]:
    return [b for b in BACKENDS if (torch.cuda.is_available() or b not in GPU_ONLY) and b != "ort-numpy"]


# ---- measuring -----------------------------------------------------------------------------------------

def load_and_warm(runner, warmup_steps: int | None) -> tuple[dict, object]:
    """Load and one warm-up run with the warm-up step count (reported, excluded from the timings)."""
    entry = {"status": "ok", "rss_before_load": rss_bytes(), "load_avg_before": load_avg()}
    entry["load_seconds"], _ = timed(runner.load)
    entry["engine_build_seconds"] = runner.build_seconds
    folder = runner.folder  # engines: the bytes of the folder (ONNX files, packages)
    entry["engine_bytes"] = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file()) if folder else None
    warm = runner.run(warmup_steps)
    entry["warmup_seconds"] = warm.seconds
    return entry, warm


def measure(runners: dict, repeats: int, warmup_steps: int | None, interleave: bool, settle=lambda: None):
    """Sequential: one backend at a time (load, warm up, `repeats` runs, close). Interleaved: each alone (load,
    warm-up run: its memory, close), then all loaded and warmed up again, timed in `repeats` rounds of one run
    per backend. `settle()` right before timed runs (after the engine builds, which the idle wait preceded:
    minutes of load of our own). Returns (entries, {name: (timed runs, runs whose memory counts)})."""
    entries, memory, runs = {}, {}, {n: [] for n in runners}

    def attempt(n: str, fn) -> bool:
        """fn(); a backend that cannot run or fails gets its status instead, and the others go on."""
        try:
            fn()
            return True
        except Unavailable as e:
            entries[n] = {"status": f"unavailable: {e}"}
        except Exception as e:
            log.exception("a backend failed")
            entries[n] = {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        return False

    def alone(n: str, r) -> None:
        entries[n], warm = load_and_warm(r, warmup_steps)
        if interleave:
            memory[n] = [warm]
        else:
            settle()
            runs[n] = memory[n] = [r.run() for _ in range(repeats)]

    for n, r in runners.items():
        attempt(n, lambda: alone(n, r))
        r.close()
        log.info("%s: %s", n, entries[n]["status"])
    live = [n for n in runners if entries[n]["status"] == "ok"]
    if interleave:  # the first entry (load, warm-up alone) is the one reported
        live = [n for n in live if attempt(n, lambda: load_and_warm(runners[n], warmup_steps))]
        settle()
        for _ in range(repeats):
            for n in list(live):
                if not attempt(n, lambda: runs[n].append(runners[n].run())):
                    entries[n] = {"status": "failed during the timed rounds (see the log)"}
                    live.remove(n)
                    runners[n].close()
    for n in live:
        entries[n]["load_avg_after"] = load_avg()
        runners[n].close()
    return entries, {n: (runs[n], memory[n]) for n in live}


def summarize(entry: dict, runs: list, steps: int, memory_runs: list) -> dict:
    """Timings from `runs`; peak memory from `memory_runs` (the same runs, or the warm-up run when the
    timed runs had every backend loaded at once)."""
    entry["stages"] = {k: stats([r.stages[k] for r in runs]) for k in STAGES if all(k in r.stages for r in runs)}
    entry["stages"]["denoise_step"] = stats([r.stages["denoise"] / steps for r in runs])
    entry["stages"]["end_to_end"] = stats([r.seconds for r in runs])
    for key in ("host_peak", "cuda_peak"):
        seen = [getattr(r, key) for r in memory_runs if any(v is not None for v in getattr(r, key).values())]
        entry[key] = {k: max(c.get(k) or 0 for c in seen) for k in STAGES} if seen else {}
        if seen:
            entry[key]["end_to_end"] = max(entry[key].values())
    if all(r.network_seconds is not None for r in runs):
        entry["outside_network_fraction"] = stats([(r.seconds - r.network_seconds) / r.seconds
                                                   for r in runs])["median"]
    return entry


def compare_videos(runs: dict, reference: str = "torch") -> dict[str, dict]:
    """Per backend: the largest |difference| of its video from the reference backend's (same seed, settings;
    the last timed run of each), except for the reference itself, and between its own timed runs."""
    ref = runs[reference][0][-1].video if reference in runs else None
    return {name: {"video_reference": reference if ref is not None else None,
                   "video_max_abs_diff": None if ref is None or name == reference
                   else (timed[-1].video - ref).abs().max().item(),
                   "video_run_to_run_max_abs_diff": max((r.video - timed[0].video).abs().max().item()
                                                        for r in timed[1:]) if len(timed) > 1 else None}
            for name, (timed, _) in runs.items()}


def add_ratios(backends: dict, costs: dict, gpu_name: str | None, roof: dict) -> None:
    """Speedups against torch and diffusers (ratios of medians); the achieved fraction of this machine's measured
    GEMM roof (the cost model's FLOPs over the median time, over measure.gemm_roof's FLOP/s); on a known GPU,
    the achieved floor fraction."""
    med = lambda b, k: b["stages"].get(k, {}).get("median")  # noqa: E731
    ok = {n: b for n, b in backends.items() if b["status"] == "ok"}
    for base in (b for b in ("torch", "diffusers") if b in ok):
        for name, b in ok.items():
            if name != base:
                b.setdefault("speedup", {})[base] = {k: med(ok[base], k) / med(b, k) for k in ok[base]["stages"]
                                                     if med(b, k)}
    for b in ok.values():
        b["gemm_roof_fraction"] = {k: costs[k]["flops"] / med(b, k) / roof["flops_per_s"]
                                   for k in ("denoise", "end_to_end") if med(b, k)}
    key = next((g for g in cost.GPUS if g in gpu_name.upper()), None) if gpu_name else None
    for b in ok.values() if key else ():
        b["floor_fraction"] = {k: costs[k]["floor_s"][f"{key} bf16"] / med(b, k) for k in costs if med(b, k)}


def targets(backends: dict, roof: dict) -> list[str]:
    """The project's targets, stated with what this run measured (CPU, `small`)."""
    ok = {n: b for n, b in backends.items() if b["status"] == "ok"}
    sp = ok.get("ort", {}).get("speedup", {})
    goals = {"torch": "ORT ≥ 1.5× torch eager end to end", "diffusers": "ORT ahead of diffusers end to end"}
    out = [f"{goal}: {sp[base]['end_to_end']:.2f}×" for base, goal in goals.items() if base in sp]
    loops = [f"{n} {100 * b['gemm_roof_fraction']['denoise']:.0f}%" for n, b in ok.items()
             if "denoise" in b.get("gemm_roof_fraction", {})]
    if loops:
        out.append(f"denoise loop ≥ 90% of the measured GEMM roof ({roof_text(roof)}): " + ", ".join(loops))
    if "ort" in backends and "ort" not in ok:
        out.append(f"ORT targets not measured ({backends['ort']['status']})")
    if "ort" in ok and "ort-dynamic" in ok:
        r = {k: ok["ort-dynamic"]["stages"][k]["median"] / ok["ort"]["stages"][k]["median"]
             for k in ("end_to_end", "denoise")}
        out.append(f"dynamic-shape engines within 5% of static ones: ort-dynamic / ort end to end "
                   f"{r['end_to_end']:.3f}, denoise {r['denoise']:.3f}")
    for name in ("torch", "ort"):
        if ok.get(name, {}).get("outside_network_fraction") is not None:
            out.append(f"{name} runtime work outside the networks ≤ 2%: "
                       f"{100 * ok[name]['outside_network_fraction']:.2f}%")
    if "torch" in ok.get("diffusers", {}).get("speedup", {}):
        out.append(f"torch eager vs diffusers end to end: {1 / ok['diffusers']['speedup']['torch']['end_to_end']:.2f}×")
    return out


# ---- the mode ------------------------------------------------------------------------------------------

def check_checkpoint(args, preset) -> None:
    """--ckpt_dir must hold the bench preset's model: another task's failed every row after the builds and the
    wait; another model of the same task (tiny-4h for tiny) ran its weights with the preset's config, or failed
    every row (tiny for small), and exited 0 either way."""
    from flf2v.models import checkpoint as ck
    theirs = ck.preset_for(args.ckpt_dir)
    if theirs.name != preset.name:
        make = f" (`flf2v-make-tiny --preset {preset.name} DIR` writes one)" if preset.t5.vocab < 100_000 else ""
        raise BadInput(f"--ckpt_dir {args.ckpt_dir}: --preset {args.preset} runs model preset {preset.name} "
                       f"({preset.dit.model_type}), this checkpoint holds another ({theirs.name}, "
                       f"{theirs.dit.model_type}); give a {preset.name} checkpoint{make} or drop --ckpt_dir")
    ck.check_files(args.ckpt_dir, theirs)


def run(s) -> Report | None:
    args, bp = s.args, BENCH_PRESETS[s.args.preset]
    steps, repeats = args.steps or bp.steps, args.repeats or bp.repeats
    preset, (w, h) = get_preset(bp.model), (int(v) for v in bp.size.split("*"))
    if args.cost_only:
        print(f"{args.preset}: {bp.model}, {w}x{h}, {bp.frames} frames, {steps} steps, CFG batch 2\n")
        print("\n".join(cost_lines(cost.cost_table(preset, w, h, bp.frames, steps))))
        return None
    from flf2v.runtime.cli_args import check_device
    from flf2v.runtime.media import InputError
    try:
        device = check_device(args.device)
    except InputError as e:
        raise BadInput(str(e)) from None
    if args.ckpt_dir:
        check_checkpoint(args, preset)
    asked = args.backends or default_backends()
    if device.type != "cuda" and all(n in GPU_ONLY for n in asked):  # else a report of "unavailable" rows, exit 0
        raise BadInput(f"--backends {','.join(asked)}: none of them runs without a CUDA GPU; add torch or ort")
    if bp.gpu_only and device.type != "cuda":
        raise BadInput(f"--preset {args.preset} needs a CUDA GPU; use tiny or small here")
    if bp.gpu_only and not args.ckpt_dir:
        raise BadInput(f"--preset {args.preset} needs --ckpt_dir (the real checkpoint)")
    from flf2v.export.contracts import COMPUTE_DTYPE
    dtype = COMPUTE_DTYPE[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    with contextlib.suppress(ImportError):  # the torchvision fallback notice of CLIPImageProcessor
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    interleave = not bp.gpu_only if args.interleave is None else args.interleave
    job = Job(Path(args.ckpt_dir) if args.ckpt_dir else s.checkpoint(bp.model), preset, w, h, bp.frames, steps,
              preset.sample_shift, preset.sample_guide_scale)
    costs = cost.cost_table(preset, w, h, bp.frames, steps)
    runners = {n: DiffusersRunner(job, device, dtype) if n == "diffusers"
               else OursRunner(n, job, device, dtype, s.work / "engines") for n in asked}
    entries, runs = measure(runners, repeats, bp.warmup_steps, interleave, s.settle)
    videos = compare_videos(runs)
    backends = {n: summarize(e, runs[n][0], steps, runs[n][1]) | videos[n] if n in runs else e
                for n, e in entries.items()}
    roof = gemm_roof(device, dtype)  # after the runs, in their process and threads: the machine as it ran them
    add_ratios(backends, costs, s.machine["gpu"]["name"] if s.machine["gpu"] else None, roof)
    job_json = {"task": preset.dit.model_type, "model_preset": preset.name, "width": w, "height": h,
                "frames": bp.frames, "steps": steps, "shift": job.shift, "guide": job.guide, "seed": job.seed,
                "prompt": job.prompt, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
                "repeats": repeats, "warmup_steps": bp.warmup_steps or steps, "cfg_batch_ours": 2,
                "negative_prompt": job.negative_prompt, "order": "interleaved" if interleave else "sequential",
                "ckpt_dir": str(args.ckpt_dir) if args.ckpt_dir else None}  # None: random weights
    result = {"job": job_json, "costs_note": cost.__doc__.strip(), "cost": costs, "gemm_roof": roof,
              "backends": backends, "notes": PEER_NOTES, "targets": targets(backends, roof)}
    status = {n: b["status"] for n, b in backends.items()}  # no chart without a bar: matplotlib drew an empty one
    return Report("benchmark", result, markdown(result, s.machine), chart="ok" in status.values(),
                  failed=[n for n, st in status.items() if st.startswith("failed")])


# ---- Markdown ------------------------------------------------------------------------------------------

def _s(x: float | None) -> str:
    return num(x, "{:.3g}" if x is None or x < 100 else "{:.0f}")


def _cell(st: dict | None) -> str:
    return "–" if not st else f"{_s(st['median'])} [{_s(st['min'])}–{_s(st['max'])}]" if st["n"] > 1 \
        else _s(st["median"])


def roof_text(roof: dict) -> str:
    return (f"{roof['flops_per_s'] / 1e9:.1f} GFLOP/s, best {roof['n']}³ {roof['dtype']} torch.mm on "
            f"{roof['threads']} threads")


def cost_lines(costs: dict, achieved: dict[str, str] | None = None) -> list[str]:
    """Markdown table of cost.cost_table(); `achieved`: stage -> text for a GPU column."""
    gpus = ("H100 bf16", "H100 fp8", "H200 bf16", "H200 fp8")
    head = ["stage", "FLOPs", "min GB (bf16)", *gpus] + (["achieved fraction of the floor (this GPU, bf16)"]
                                                         if achieved else [])
    return table(head, [[STAGE_LABELS[k], f"{c['flops']:.3g}", f"{c['min_bytes_bf16'] / 1e9:.3g}",
                         *(f"{c['floor_s'][g]:.3g} s" for g in gpus)] + ([achieved.get(k, "")] if achieved else [])
                        for k, c in costs.items()])


def markdown(r: dict, m: dict) -> list[str]:
    job, ok = r["job"], {k: v for k, v in r["backends"].items() if v["status"] == "ok"}
    gib = lambda b: num(b if b is None else b / GiB, "{:.2f}")  # noqa: E731
    lines = [f"Job: {job['task']}, {job['width']}x{job['height']}, {job['frames']} frames, {job['steps']} UniPC steps "
             f"(shift {job['shift']}), CFG {job['guide']}, {job['dtype']} on {job['device']}, seed {job['seed']}; "
             + (f"weights of `{job['ckpt_dir']}`" if job.get("ckpt_dir") else "random weights in the official layout")
             + f" (model preset `{job['model_preset']}`). One warm-up run "
             f"({job['warmup_steps']} steps, excluded), then {job['repeats']} timed runs per backend in this process, "
             + ("in rounds of one run per backend with all backends loaded (peak memory: from the warm-up run, one "
                "backend loaded at a time)" if job["order"] == "interleaved" else "one backend after another")
             + ". Seconds: median [min–max].", "", "## Time per stage (s)", ""]
    rows = []
    for name, b in r["backends"].items():
        if b["status"] != "ok":
            rows.append([name, b["status"]] + [""] * (len(STAGE_LABELS) + 2))
            continue
        out, load = b.get("outside_network_fraction"), [x[0] for x in (b.get("load_avg_before"),
                                                                       b.get("load_avg_after")) if x]
        rows.append([name, *(_cell(b["stages"].get(c)) for c in STAGE_LABELS), _s(b["warmup_seconds"]),
                     num(out if out is None else 100 * out, "{:.1f}%"), "→".join(f"{x:.1f}" for x in load)])
    lines += table(["backend", *STAGE_LABELS.values(), "warm-up", "outside network", "load avg"], rows)
    ratios = [(base, k) for base in ("torch", "diffusers") for k in ("end_to_end", "denoise")]
    lines += ["", "## Speedups (ratio of medians, same process and machine)", ""] + table(
        ["backend", "vs torch eager, end to end", "vs torch eager, denoise loop", "vs diffusers, end to end",
         "vs diffusers, denoise loop", "max abs diff of the video vs the torch reference"],
        [[n, *(num(b.get("speedup", {}).get(base, {}).get(k), "{:.2f}×") for base, k in ratios),
          "(reference)" if b.get("video_reference") == n else num(b.get("video_max_abs_diff"), "{:.2e}")]
         for n, b in ok.items()])
    if r["targets"]:
        lines += ["", "Targets (measured, not asserted): " + "; ".join(r["targets"]) + "."]
    mem = [c for c in STAGE_LABELS if c != "denoise_step"]
    lines += ["", "## Peak memory per stage (GiB, host RSS" + (", CUDA max allocated" if m["gpu"] else "") + ")", ""]
    lines += table(["backend", "before load", *(STAGE_LABELS[c] for c in mem)], [
        [n, gib(b["rss_before_load"]), *(gib(b["host_peak"].get(c)) + (f" / {gib(b['cuda_peak'][c])}"
                                                                          if c in b["cuda_peak"] else "") for c in mem)]
        for n, b in ok.items()])
    built = {n: b for n, b in ok.items() if b.get("engine_build_seconds") is not None}
    if built:
        lines += ["", "## Engine builds (`flf2v-build` in a child process, before the runs)", ""] + table(
            ["backend", "build (s)", "folder size (MiB)"],
            [[n, f"{b['engine_build_seconds']:.1f}", f"{(b.get('engine_bytes') or 0) / 2**20:.1f}"]
             for n, b in built.items()])
    achieved = {stage: ", ".join(f"{n} {100 * b['floor_fraction'][stage]:.1f}%" for n, b in ok.items()
                                 if stage in b.get("floor_fraction", {})) for stage in r["cost"]} if m["gpu"] else None
    lines += ["", "## Cost model (FLOPs, minimum bytes, floor time on one GPU)", "", *cost_lines(r["cost"], achieved)]
    roof = [[n, *(num(b["gemm_roof_fraction"].get(k), "{:.0%}") for k in ("denoise", "end_to_end"))]
            for n, b in ok.items()]
    lines += ["", f"Achieved fraction of this machine's measured GEMM roof ({roof_text(r['gemm_roof'])}): the "
              "cost model's FLOPs over the median time, over the roof.", "",
              *table(["backend", "denoise loop", "end to end"], roof)]
    return lines + ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
