"""`flf2v-bench fewstep`: the official 50 steps with CFG against a 4-step CFG-free run, and what LoRAs cost.

    flf2v-bench fewstep [--preset small] [--out bench/results] [--work DIR] [--steps 50]

One process, this machine, the `small` random checkpoint and its ONNX Runtime engines (fp32, both DiT
layouts: batch 2 for CFG, batch 1 for CFG-free):
- 50 UniPC steps with CFG (guide 5, one batch-2 DiT call per step = 100 DiT forwards) against 4 steps
  CFG-free (LightX2V's step-distill schedule 1000, 750, 500, 250 at shift 5, guide 1: 4 forwards); DiT
  forwards are counted, times measured end to end and in the denoising loop. Random weights: the 4-step
  video is not a distilled model's video, only its cost.
- LoRA costs: merging a rank-16 LoRA over every block linear while loading the torch DiT (vs loading it
  plain), swapping it into the ONNX Runtime DiT session (vs creating the plain session), and rebuilding
  the DiT engine with it (`flf2v-build --graphs dit_b2 --lora`), the alternative the swap saves.
Writes fewstep-<preset>-<machine>-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

FEW_STEPS = (1000, 750, 500, 250)
FEW_SHIFT = 5.0


def write_lora(path: Path, ckpt_dir, rank: int = 16, seed: int = 0) -> Path:
    """A LoRA over every linear of every block, official key names (lora_A / lora_B)."""
    from safetensors.torch import save_file

    from flf2v.models import checkpoint as ck
    cfg = ck.read_dit_config(ckpt_dir)
    gen = torch.Generator().manual_seed(seed)
    dims = {"self_attn.q": (cfg.dim, cfg.dim), "self_attn.k": (cfg.dim, cfg.dim), "self_attn.v": (cfg.dim, cfg.dim),
            "self_attn.o": (cfg.dim, cfg.dim), "cross_attn.q": (cfg.dim, cfg.dim), "cross_attn.k": (cfg.dim, cfg.dim),
            "cross_attn.v": (cfg.dim, cfg.dim), "cross_attn.o": (cfg.dim, cfg.dim),
            "ffn.0": (cfg.ffn_dim, cfg.dim), "ffn.2": (cfg.dim, cfg.ffn_dim)}
    sd = {}
    for i in range(cfg.num_layers):
        for name, (out_dim, in_dim) in dims.items():
            sd[f"blocks.{i}.{name}.lora_A.weight"] = torch.randn(rank, in_dim, generator=gen) * 0.01
            sd[f"blocks.{i}.{name}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.01
    save_file(sd, str(path))
    return path


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _build(ckpt, out: Path, *extra) -> float:
    cmd = [sys.executable, "-c", "import sys; from flf2v.export.build import main; sys.exit(main(sys.argv[1:]))",
           "--ckpt_dir", str(ckpt), "--backend", "ort", "--precision", "fp32", "--cfg_batch", "both",
           "--out", str(out), "--quiet", *extra]
    t, proc = _timed(lambda: subprocess.run(cmd, capture_output=True, text=True))
    if proc.returncode:
        raise SystemExit(f"flf2v-bench fewstep: flf2v-build failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return t


def sampling(folder: Path, ckpt, preset, steps: int) -> dict:
    """50 steps with CFG vs 4 steps CFG-free through the same engines; DiT forwards counted."""
    from flf2v.bench.runners import Job
    from flf2v.runtime.pipeline import Pipeline
    pipe = Pipeline.from_engines(folder, ckpt)
    forwards = []
    real = pipe.backend.denoise
    pipe.backend.denoise = lambda x, *a: forwards.append(x.shape[0]) or real(x, *a)
    w, h = (int(v) for v in preset.default_size.split("*"))
    job = Job(ckpt, preset, w, h, preset.frame_num, steps, preset.sample_shift, preset.sample_guide_scale)
    first, last = job.frames_in()
    runs = {"cfg": dict(sample_steps=steps, guide_scale=preset.sample_guide_scale),
            "few-step CFG-free": dict(sample_timesteps=list(FEW_STEPS), sample_shift=FEW_SHIFT, guide_scale=1.0)}
    out = {}
    for name, kw in runs.items():
        pipe.generate(job.prompt, first, last, seed=1, progress=False, **{**kw, "sample_steps": 1}
                      if name == "cfg" else kw)  # warm-up (one step for the long run)
        forwards.clear()
        t, _ = _timed(lambda: pipe.generate(job.prompt, first, last, seed=42, progress=False, **kw))
        out[name] = {"seconds": t, "denoise_s": pipe.times.seconds["denoise"], "dit_calls": len(forwards),
                     "dit_forwards": sum(forwards), "settings": {k: v for k, v in kw.items()}}
    return out


def lora_costs(folder: Path, ckpt, preset, work: Path) -> dict:
    from flf2v.models import checkpoint as ck
    from flf2v.models.lora import load_dit, load_loras
    from flf2v.runtime.ort_backend import OrtBackend
    lora_path = write_lora(work / "lora-r16.safetensors", ckpt)
    t_read, loras = _timed(lambda: load_loras([(str(lora_path), 1.0)], ckpt))
    t_plain, _ = _timed(lambda: ck.load_dit(ckpt, torch.float32, preset))
    t_merged, _ = _timed(lambda: load_dit(ckpt, torch.float32, preset, loras))
    t_session, _ = _timed(lambda: OrtBackend(folder, ckpt, preset).session("dit_b2"))
    t_swap, _ = _timed(lambda: OrtBackend(folder, ckpt, preset, loras=loras).session("dit_b2"))
    t_rebuild = _build(ckpt, work / "engines-lora", "--graphs", "dit_b2", "--lora", str(lora_path))
    return {"lora": {"rank": 16, "bytes": lora_path.stat().st_size, "keys": len(loras[0][0].keys)},
            "read_s": t_read, "torch_load_plain_s": t_plain, "torch_load_merged_s": t_merged,
            "ort_session_plain_s": t_session, "ort_session_swapped_s": t_swap, "ort_rebuild_dit_s": t_rebuild}


def markdown(r: dict) -> str:
    s, lc = r["sampling"], r["lora"]
    lines = [f"# flf2v few-step / CFG-free and LoRA costs: `{r['preset']}` on {r['machine']}", "",
             f"{r['date']} · torch {torch.__version__} · onnxruntime {r['onnxruntime']} · ONNX Runtime fp32 "
             f"engines (batch-2 and batch-1 DiT) · one timed run each after a warm-up · load average "
             f"{r['load'][0]:.2f} before, {r['load'][1]:.2f} after", "",
             "| run | DiT calls | DiT forwards (batch rows) | denoise (s) | end to end (s) |", "|---|---:|---:|---:|---:|"]
    for name, v in s.items():
        lines.append(f"| {name} | {v['dit_calls']} | {v['dit_forwards']} | {v['denoise_s']:.2f} | {v['seconds']:.2f} |")
    a, b = s["cfg"], s["few-step CFG-free"]
    lines += ["", f"Speedup: {a['denoise_s'] / b['denoise_s']:.1f}x in the denoising loop, "
              f"{a['seconds'] / b['seconds']:.1f}x end to end ({a['dit_forwards']} vs {b['dit_forwards']} DiT "
              f"forwards).", "",
              f"LoRA: rank {lc['lora']['rank']} over every block linear ({lc['lora']['keys']} weights, "
              f"{lc['lora']['bytes'] / 2**20:.1f} MiB)", "", "| step | seconds |", "|---|---:|",
              f"| read + map the LoRA | {lc['read_s']:.2f} |",
              f"| torch DiT load, plain | {lc['torch_load_plain_s']:.2f} |",
              f"| torch DiT load, LoRA merged while loading | {lc['torch_load_merged_s']:.2f} |",
              f"| ORT DiT session, plain | {lc['ort_session_plain_s']:.2f} |",
              f"| ORT DiT session, LoRA swapped in (its weights replaced in the graph) | {lc['ort_session_swapped_s']:.2f} |",
              f"| rebuild of the DiT engine with the LoRA (`flf2v-build --graphs dit_b2 --lora`) | "
              f"{lc['ort_rebuild_dit_s']:.2f} |", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    from flf2v.bench.cli import _load_avg
    from flf2v.bench.report import machine_info, side_study, write_side_study
    from flf2v.export.contracts import engine_shapes
    from flf2v.models.config import get_preset
    ap = argparse.ArgumentParser(prog="flf2v-bench fewstep", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", choices=("tiny", "small"))
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--work", default=None, help="keep the checkpoint and engines here")
    ap.add_argument("--steps", type=int, default=50, help="steps of the CFG run (default 50, the official count)")
    args = ap.parse_args(argv)
    import onnxruntime
    with side_study("fewstep", args.preset, args.work) as (work, ckpt):
        preset = get_preset(args.preset)
        folder = work / "engines"
        build_s = _build(ckpt, folder, "--preset", next(iter(engine_shapes(preset))))  # the default static shape
        machine = machine_info()
        load0 = (_load_avg() or [0.0])[0]
        r = {"preset": args.preset, "machine": machine["description"], "date": machine["date"],
             "onnxruntime": onnxruntime.__version__, "build_s": build_s,
             "sampling": sampling(folder, ckpt, preset, args.steps), "lora": lora_costs(folder, ckpt, preset, work)}
        r["load"] = [load0, (_load_avg() or [0.0])[0]]
        write_side_study(args.out, "fewstep", args.preset, machine, r, markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
