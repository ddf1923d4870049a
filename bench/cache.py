"""`flf2v-bench cache [--preset small] [--steps 50]`: the step cache (TeaCache, MagCache) against the uncached run
(README "Step cache"). --preset's random checkpoint and ONNX Runtime fp32 engines, calibrated by
`flf2v-calibrate-cache` (timed); each run after a warm-up: its schedule, DiT forwards, denoise and end-to-end
seconds, PSNR and SSIM against the uncached video. TeaCache at 0.5 and 1.0: the authors' 0.2 and 0.3 skip nothing
on random weights, whose output changes ~40 % a step.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .measure import BadInput, run_module, timed
from .report import Report, table
from .runners import Job

RUNS = {  # name -> generate() options
    "off": {},
    "magcache 0.12 K4": dict(cache="magcache", cache_threshold=0.12, cache_max_skips=4),
    "magcache 0.24 K6": dict(cache="magcache", cache_threshold=0.24, cache_max_skips=6),
    "teacache 0.5": dict(cache="teacache", cache_threshold=0.5),
    "teacache 1.0": dict(cache="teacache", cache_threshold=1.0),
}


def add_args(ap) -> None:
    ap.add_argument("--preset", default="small", choices=("tiny", "small"))
    ap.add_argument("--steps", type=int, default=50, help="steps (default 50, the official count)")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of videos in [-1, 1] (rescaled to [0, 1])."""
    mse = float((((a - b) / 2) ** 2).mean())
    return math.inf if mse == 0 else -10 * math.log10(mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1) over
    every frame and channel of videos [3, F, H, W] in [-1, 1]."""
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = (g / g.sum()).float()
    win = (g[:, None] * g[None, :])[None, None]
    x, y = (((v.float() + 1) / 2).permute(1, 0, 2, 3).reshape(-1, 1, *v.shape[2:]) for v in (a, b))
    blur = lambda t: F.conv2d(t, win)  # noqa: E731 - 'valid' windows, as scikit-image's default crop
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def build_ort(ckpt, folder, *extra) -> float:
    """Seconds of `flf2v-build` of fp32 ONNX Runtime engines of `ckpt` into `folder`, in a child process."""
    return run_module("flf2v.export.build", "--ckpt_dir", str(ckpt), "--backend", "ort", "--precision", "fp32",
                      "--out", str(folder), "--quiet", *extra)


def ort_engines(s, folder, *extra) -> tuple[float, Job]:
    """Build seconds of --preset's ONNX Runtime fp32 engines at its default static shape (into `folder`,
    from a random checkpoint) and the Job of that shape with --steps steps. cache and fewstep share it."""
    from flf2v.export.contracts import engine_shapes
    from flf2v.models.config import get_preset
    preset, ckpt = get_preset(s.args.preset), s.checkpoint(s.args.preset)
    shape = next(iter(engine_shapes(preset).values()))
    build_s = build_ort(ckpt, folder, "--preset", shape.name, *extra)
    return build_s, Job(ckpt, preset, shape.width, shape.height, shape.frame_num, s.args.steps, preset.sample_shift,
                        preset.sample_guide_scale)


def timed_runs(folder, job: Job, runs: dict, names=("denoise",), warm: dict | None = None):
    """Yields (name, seconds, video, calls, pipe) of each run (name -> generate() options) through the engines in
    `folder`: seed 42 after a warm-up with seed 1 (sessions made, loop kept; warm: name -> the warm-up's options);
    calls: (call, DiT batch rows) of each of the backend's `names` calls in the timed run."""
    from flf2v.runtime.pipeline import Pipeline
    pipe = Pipeline.from_engines(folder, job.ckpt_dir)
    calls, (first, last) = [], job.frames_in()
    for call in names:
        real = getattr(pipe.backend, call)
        setattr(pipe.backend, call,
                lambda x, *a, _real=real, _call=call: calls.append((_call, x.shape[0])) or _real(x, *a))
    for name, kw in runs.items():
        pipe.generate(job.prompt, first, last, seed=1, progress=False, **(warm or {}).get(name, kw))
        calls.clear()
        t, video = timed(lambda: pipe.generate(job.prompt, first, last, seed=42, progress=False, **kw))
        yield name, t, video, calls, pipe


def runs(folder, job: Job) -> dict:
    out, ref = {}, None
    options = {name: dict(sample_steps=job.steps, guide_scale=job.guide, **kw) for name, kw in RUNS.items()}
    for name, t, video, calls, pipe in timed_runs(folder, job, options, ("denoise", "denoise_full", "denoise_cached")):
        ref = video if ref is None else ref
        out[name] = {"seconds": t, "denoise_s": pipe.times.seconds["denoise"],
                     "dit_forwards": sum(n for k, n in calls if k != "denoise_cached"),
                     "cached_forwards": sum(n for k, n in calls if k == "denoise_cached"),
                     "psnr_db": psnr(video, ref), "ssim": ssim(video, ref), "settings": RUNS[name]}
        if pipe.last_cache:
            out[name]["cache"] = pipe.last_cache.to_json()
    return out


def run(s) -> Report:
    import onnxruntime

    from flf2v.models.make_tiny import write_demo_frames
    from flf2v.runtime.cache import MIN_STEPS
    steps, folder = s.args.steps, s.work / "cache-engines"
    if steps < MIN_STEPS:  # the calibration's, found in its child process after the engine build
        raise BadInput(f"--steps {steps}: the step cache's calibration needs at least {MIN_STEPS} steps")
    build_s, job = ort_engines(s, folder)
    first, last = write_demo_frames(s.work / "frames", (job.width, job.height))  # as Job.frames_in
    # calibrated on another seed than the timed runs: one sample, as MagCache's authors calibrate
    calibrate_s = run_module("flf2v.runtime.calibrate_cache", "--ckpt_dir", str(job.ckpt_dir), "--first_frame",
                             str(first), "--last_frame", str(last), "--prompt", job.prompt, "--size", job.size,
                             "--frame_num", str(job.frames), "--sample_steps", str(steps), "--base_seed", "7",
                             "--device", "cpu", "--quiet")
    s.settle()
    r = {"onnxruntime": onnxruntime.__version__, "steps": steps, "build_s": build_s, "calibrate_s": calibrate_s,
         "runs": runs(folder, job)}
    off = r["runs"]["off"]["denoise_s"]
    rows = [[name, f"`{v.get('cache', {}).get('schedule', 'F' * steps)}`", v["dit_forwards"], v["cached_forwards"] // 2,
             f"{v['denoise_s']:.2f}", f"{v['seconds']:.2f}", f"{off / v['denoise_s']:.2f}x", f"{v['psnr_db']:.1f}",
             f"{v['ssim']:.4f}"] for name, v in r["runs"].items()]
    return Report("step cache", r, [
        f"ONNX Runtime fp32 engines (batch-2 DiT + its cached step) · {steps} UniPC steps with CFG · one timed run "
        f"each after a warm-up.", "",
        f"Calibration (`flf2v-calibrate-cache`, torch reference, fp32): {calibrate_s:.1f} s. Random weights: the "
        f"schedules, PSNR and SSIM below say nothing about visual quality on real weights (the quality gate there "
        f"is PSNR/SSIM against the full run, as the methods' authors report, and needs the real checkpoint); the "
        f"time saved per skipped step does.", "",
        *table(["run", "schedule (F full, c cached)", "DiT forwards", "cached steps", "denoise (s)", "end to end (s)",
                "denoise speedup", "PSNR vs off (dB)", "SSIM vs off"], rows, left=2), "",
        "DiT forwards count batch rows (cond + uncond as one batch-2 call = 2). A cached step runs the DiT's patch "
        "and time embeddings and head only (`dit_cached_b2`)."])
