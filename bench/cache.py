"""`flf2v-bench cache`: the step cache (TeaCache, MagCache) against the uncached run, side by side in one process.

    flf2v-bench cache [--preset small] [--out bench/results] [--work DIR] [--steps 50]

This machine, the `small` random checkpoint and its ONNX Runtime engines (fp32, static `small` shape, the
batch-2 DiT and its cached step). The checkpoint is calibrated first by `flf2v-calibrate-cache` (one full
run of the torch reference; its time is reported). Then, each after a warm-up: the cache off, MagCache at
the authors' two Wan2.1 I2V 720p settings (threshold 0.12 with at most 4 skips in a row, 0.24 with 6) and
TeaCache at 0.5 and 1.0 (the authors' 0.2 and 0.3 skip nothing here: fitted on random weights, whose
output changes ~40 % a step, one step's rescaled change already exceeds them). For each: the schedule, DiT forwards (counted at the backend), denoise and
end-to-end seconds, and the decoded video's PSNR and SSIM against the uncached video of the same seed.
Random weights: the calibrated curves are not a trained model's, so which steps are skipped and the
PSNR/SSIM say nothing of the visual quality on real weights; the time per DiT forward skipped does.
Writes cache-<preset>-<machine>-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RUNS = {  # name -> generate() options (None: cache off)
    "off": {},
    "magcache 0.12 K4": dict(cache="magcache", cache_threshold=0.12, cache_max_skips=4),
    "magcache 0.24 K6": dict(cache="magcache", cache_threshold=0.24, cache_max_skips=6),
    "teacache 0.5": dict(cache="teacache", cache_threshold=0.5),
    "teacache 1.0": dict(cache="teacache", cache_threshold=1.0),
}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of videos in [-1, 1] (rescaled to [0, 1])."""
    mse = float((((a - b) / 2) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1) over
    every frame and channel of videos [3, F, H, W] in [-1, 1]."""
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = (g / g.sum()).float()
    win = (g[:, None] * g[None, :])[None, None]
    x = ((a.float() + 1) / 2).permute(1, 0, 2, 3).reshape(-1, 1, *a.shape[2:])
    y = ((b.float() + 1) / 2).permute(1, 0, 2, 3).reshape(-1, 1, *b.shape[2:])

    def blur(t):
        return F.conv2d(t, win)  # 'valid' windows, as scikit-image's default crop
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _cli(module: str, *args) -> float:
    cmd = [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))", *args]
    t, proc = _timed(lambda: subprocess.run(cmd, capture_output=True, text=True))
    if proc.returncode:
        raise SystemExit(f"flf2v-bench cache: {module} failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return t


def count_forwards(backend) -> list[int]:
    """DiT batch rows per call, full and cached, appended as the backend runs them."""
    rows = []
    for name in ("denoise", "denoise_full", "denoise_cached"):
        real = getattr(backend, name)
        setattr(backend, name, lambda x, *a, _real=real, _name=name: rows.append((_name, x.shape[0])) or _real(x, *a))
    return rows


def runs(folder: Path, ckpt, job, steps: int) -> dict:
    from flf2v.runtime.pipeline import Pipeline
    pipe = Pipeline.from_engines(folder, ckpt)
    calls = count_forwards(pipe.backend)
    first, last = job.frames_in()
    common = dict(sample_steps=steps, guide_scale=job.preset.sample_guide_scale, progress=False)
    out, ref = {}, None
    for name, kw in RUNS.items():
        pipe.generate(job.prompt, first, last, seed=1, **{**common, **kw})  # warm-up: sessions, kept loop
        calls.clear()
        t, video = _timed(lambda: pipe.generate(job.prompt, first, last, seed=42, **common, **kw))
        ref = video if ref is None else ref
        full = sum(n for k, n in calls if k != "denoise_cached")
        r = {"seconds": t, "denoise_s": pipe.times.seconds["denoise"], "dit_forwards": full,
             "cached_forwards": sum(n for k, n in calls if k == "denoise_cached"),
             "psnr_db": psnr(video, ref), "ssim": ssim(video, ref), "settings": kw}
        if pipe.last_cache:
            r["cache"] = pipe.last_cache.to_json()
        out[name] = r
    return out


def markdown(r: dict) -> str:
    lines = [f"# flf2v step cache: `{r['preset']}` on {r['machine']}", "",
             f"{r['date']} · torch {torch.__version__} · onnxruntime {r['onnxruntime']} · ONNX Runtime fp32 engines "
             f"(batch-2 DiT + its cached step) · {r['steps']} UniPC steps with CFG · one timed run each after a "
             f"warm-up · load average {r['load'][0]:.2f} before, {r['load'][1]:.2f} after", "",
             f"Calibration (`flf2v-calibrate-cache`, torch reference, fp32): {r['calibrate_s']:.1f} s. "
             f"Random weights: the schedules, PSNR and SSIM below say nothing about visual quality on real "
             f"weights (the quality gate there is PSNR/SSIM against the full run, as the methods' authors "
             f"report, and needs the real checkpoint); the time saved per skipped step does.", "",
             "| run | schedule (F full, c cached) | DiT forwards | cached steps | denoise (s) | end to end (s) | "
             "denoise speedup | PSNR vs off (dB) | SSIM vs off |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    off = r["runs"]["off"]
    for name, v in r["runs"].items():
        sched = v.get("cache", {}).get("schedule", "F" * r["steps"])
        lines.append(f"| {name} | `{sched}` | {v['dit_forwards']} | {v['cached_forwards'] // 2} | "
                     f"{v['denoise_s']:.2f} | {v['seconds']:.2f} | {off['denoise_s'] / v['denoise_s']:.2f}x | "
                     f"{v['psnr_db']:.1f} | {v['ssim']:.4f} |")
    lines += ["", "DiT forwards count batch rows (cond + uncond as one batch-2 call = 2). A cached step runs the "
              "DiT's patch and time embeddings and head only (`dit_cached_b2`).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    from flf2v.bench.cli import _load_avg
    from flf2v.bench.report import machine_info, side_study, write_side_study
    from flf2v.bench.runners import Job
    from flf2v.export.contracts import engine_shapes
    from flf2v.models.config import get_preset
    from flf2v.models.make_tiny import write_demo_frames
    ap = argparse.ArgumentParser(prog="flf2v-bench cache", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", choices=("tiny", "small"))
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--work", default=None, help="keep the checkpoint and engines here")
    ap.add_argument("--steps", type=int, default=50, help="steps (default 50, the official count)")
    args = ap.parse_args(argv)
    import onnxruntime
    with side_study("cache", args.preset, args.work) as (work, ckpt):
        preset = get_preset(args.preset)
        shape = next(iter(engine_shapes(preset).values()))
        folder = work / "engines"
        build_s = _cli("flf2v.export.build", "--ckpt_dir", str(ckpt), "--backend", "ort", "--precision", "fp32",
                       "--preset", shape.name, "--out", str(folder), "--quiet")
        job = Job(ckpt, preset, shape.width, shape.height, shape.frame_num, args.steps, preset.sample_shift,
                  preset.sample_guide_scale)
        first, last = write_demo_frames(work / "frames", (shape.width, shape.height))  # as Job.frames_in
        # calibrated on another seed than the timed runs: one sample, as MagCache's authors calibrate
        calibrate_s = _cli("flf2v.runtime.calibrate_cache", "--ckpt_dir", str(ckpt), "--first_frame", str(first),
                           "--last_frame", str(last), "--prompt", job.prompt, "--size", f"{shape.width}*{shape.height}",
                           "--frame_num", str(shape.frame_num), "--sample_steps", str(args.steps), "--base_seed", "7",
                           "--device", "cpu", "--quiet")
        machine = machine_info()
        load0 = (_load_avg() or [0.0])[0]
        r = {"preset": args.preset, "machine": machine["description"], "date": machine["date"],
             "onnxruntime": onnxruntime.__version__, "steps": args.steps, "build_s": build_s,
             "calibrate_s": calibrate_s, "runs": runs(folder, ckpt, job, args.steps)}
        r["load"] = [load0, (_load_avg() or [0.0])[0]]
        write_side_study(args.out, "cache", args.preset, machine, r, markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
