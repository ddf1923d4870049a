"""`flf2v-bench fewstep [--preset small] [--steps 50]`: 50 steps with CFG against 4 steps CFG-free, and LoRA costs
(README "LoRAs, few-step and CFG-free runs"). --preset's random checkpoint and ONNX Runtime fp32 engines (batch-2
and batch-1 DiT): DiT forwards and times of both schedules; a rank-16 LoRA over every block linear merged while
loading the torch DiT, swapped into the ORT DiT session and built into a new DiT engine, each against plain.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch

from .cache import build_ort, ort_engines, timed_runs
from .measure import timed
from .report import Report, table
from .runners import Job

FEW_STEPS = (1000, 750, 500, 250)
FEW_SHIFT = 5.0
LORA_ROWS = {"read_s": "read + map the LoRA", "torch_load_plain_s": "torch DiT load, plain",
             "torch_load_merged_s": "torch DiT load, LoRA merged while loading",
             "ort_session_plain_s": "ORT DiT session, plain",
             "ort_session_swapped_s": "ORT DiT session, LoRA swapped in (its weights replaced in the graph)",
             "ort_rebuild_dit_s": "rebuild of the DiT engine with the LoRA (`flf2v-build --graphs dit_b2 --lora`)"}


def add_args(ap) -> None:
    ap.add_argument("--preset", default="small", choices=("tiny", "small"))
    ap.add_argument("--steps", type=int, default=50, help="steps of the CFG run (default 50, the official count)")


def write_lora(path: Path, ckpt_dir, rank: int = 16) -> Path:
    """A LoRA over every linear of every block, official key names (lora_A / lora_B)."""
    from safetensors.torch import save_file

    from flf2v.models import checkpoint as ck
    cfg, gen = ck.read_dit_config(ckpt_dir), torch.Generator().manual_seed(0)
    dims = {f"{a}.{p}": (cfg.dim, cfg.dim) for a in ("self_attn", "cross_attn") for p in "qkvo"}
    dims.update({"ffn.0": (cfg.ffn_dim, cfg.dim), "ffn.2": (cfg.dim, cfg.ffn_dim)})
    sd = {}
    for i, (name, (out_dim, in_dim)) in itertools.product(range(cfg.num_layers), dims.items()):
        sd[f"blocks.{i}.{name}.lora_A.weight"] = torch.randn(rank, in_dim, generator=gen) * 0.01
        sd[f"blocks.{i}.{name}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.01
    save_file(sd, str(path))
    return path


def sampling(folder: Path, job: Job) -> dict:
    """50 steps with CFG vs 4 steps CFG-free through the same engines; DiT forwards counted."""
    runs = {"cfg": dict(sample_steps=job.steps, guide_scale=job.guide),
            "few-step CFG-free": dict(sample_timesteps=list(FEW_STEPS), sample_shift=FEW_SHIFT, guide_scale=1.0)}
    warm = {"cfg": {**runs["cfg"], "sample_steps": 1}}  # one warm-up step for the long run
    return {name: {"seconds": t, "denoise_s": pipe.times.seconds["denoise"], "dit_calls": len(calls),
                   "dit_forwards": sum(n for _, n in calls), "settings": dict(runs[name])}
            for name, t, _, calls, pipe in timed_runs(folder, job, runs, warm=warm)}


def lora_costs(folder: Path, ckpt, preset, work: Path) -> dict:
    from flf2v.models import checkpoint as ck
    from flf2v.models.lora import load_dit, load_loras
    from flf2v.runtime.ort_backend import OrtBackend
    lora_path = write_lora(work / "lora-r16.safetensors", ckpt)
    t_read, loras = timed(lambda: load_loras([(str(lora_path), 1.0)], ckpt))
    return {"lora": {"rank": 16, "bytes": lora_path.stat().st_size, "keys": len(loras[0][0].keys)}, "read_s": t_read,
            "torch_load_plain_s": timed(lambda: ck.load_dit(ckpt, torch.float32, preset))[0],
            "torch_load_merged_s": timed(lambda: load_dit(ckpt, torch.float32, preset, loras))[0],
            "ort_session_plain_s": timed(lambda: OrtBackend(folder, ckpt, preset).session("dit_b2"))[0],
            "ort_session_swapped_s": timed(lambda: OrtBackend(folder, ckpt, preset, loras=loras).session("dit_b2"))[0],
            "ort_rebuild_dit_s": build_ort(ckpt, work / "fewstep-engines-lora", "--cfg_batch", "both", "--graphs",
                                           "dit_b2", "--lora", str(lora_path))}


def run(s) -> Report:
    import onnxruntime
    folder = s.work / "fewstep-engines"
    build_s, job = ort_engines(s, folder, "--cfg_batch", "both")
    s.settle()
    r = {"onnxruntime": onnxruntime.__version__, "build_s": build_s, "sampling": sampling(folder, job),
         "lora": lora_costs(folder, job.ckpt_dir, job.preset, s.work)}
    a, b, lc = r["sampling"]["cfg"], r["sampling"]["few-step CFG-free"], r["lora"]
    return Report("few-step / CFG-free and LoRA costs", r, [
        "ONNX Runtime fp32 engines (batch-2 and batch-1 DiT) · one timed run each after a warm-up.", "",
        *table(["run", "DiT calls", "DiT forwards (batch rows)", "denoise (s)", "end to end (s)"],
               [[n, v["dit_calls"], v["dit_forwards"], f"{v['denoise_s']:.2f}", f"{v['seconds']:.2f}"]
                for n, v in r["sampling"].items()]), "",
        f"Speedup: {a['denoise_s'] / b['denoise_s']:.1f}x in the denoising loop, {a['seconds'] / b['seconds']:.1f}x "
        f"end to end ({a['dit_forwards']} vs {b['dit_forwards']} DiT forwards).", "",
        f"LoRA: rank {lc['lora']['rank']} over every block linear ({lc['lora']['keys']} weights, "
        f"{lc['lora']['bytes'] / 2**20:.1f} MiB)", "",
        *table(["step", "seconds"], [[label, f"{lc[key]:.2f}"] for key, label in LORA_ROWS.items()])])
