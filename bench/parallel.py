"""`flf2v-bench parallel`: the multi-process run (runtime/parallel.py) on paper and on this machine.

    flf2v-bench parallel [--preset tiny-4h|small] [--steps 8] [--out bench/results] [--work DIR]

1. Cost model, 720p / 81 frames (paper): per step and per rank, the DiT compute (bench/cost.py's FLOPs over
   the ranks, at the H100's peak and at the efficiency the single-GPU target implies) against the bytes each
   rank sends: Ulysses' 4 all-to-alls per block (q, k, v in, attention out; bf16 [L/U, dim] shards, (U-1)/U
   of each leaves the rank) and the final all-gather of the blocks' output (fp32), FSDP's all-gather of each
   block's weights (bf16, with --dit_fsdp), CFG-parallel's one all-gather of the velocity; over NVLink
   (H100 SXM: 450 GB/s per direction) and PCIe Gen5 x16 (64 GB/s per direction). Communication is not
   overlapped with compute here (an upper bound). Expected end to end for 1, 2, 4, 8 GPUs, next to the
   official 238.8 s (8x H100, I2V 720p, 40 steps).
2. Measured (this machine, gloo over loopback): each layout launched with torchrun on the tiny-4h / small
   preset: the denoising loop's seconds per step, the DiT calls' part of it (Ulysses' collectives are inside
   the DiT; CFG-parallel's all-gather, the guidance and the sampler update are outside), and the rest,
   against one process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

NVLINK, PCIE = 450e9, 64e9  # bytes/s per direction: H100 SXM NVLink 4 (900 GB/s both ways), PCIe Gen5 x16
OFFICIAL_8X = {"seconds": 238.8, "steps": 40, "task": "i2v-14B", "size": (1280, 720), "frames": 81}
TARGET_EFFICIENCY = 662 / 800  # the single-H100 target (800 s) against its floor (662 s)
LAYOUTS = {1: [(1, False)], 2: [(2, False), (1, True)], 4: [(4, False), (2, True)], 8: [(8, False), (4, True)]}


def comm_per_step(preset, width: int, height: int, frames: int, ulysses: int, cfg_parallel: bool,
                  dit_fsdp: bool = False, gpus: int | None = None) -> dict:
    """Bytes one rank sends per denoising step (CFG on: cond + uncond) and its DiT FLOPs."""
    from flf2v.bench.cost import dit_forward_flops, dit_params, dit_tokens
    cfg = preset.dit
    ss, st = preset.vae.stride[1], preset.vae.stride[0]
    latent = ((frames - 1) // st + 1, height // ss, width // ss)
    n = dit_tokens(cfg, latent)
    u = ulysses
    shard = -(-n // u)
    calls = 1 if cfg_parallel else 2  # DiT calls per rank per step (batch 1 each, or one batch-2 call)
    gpus = gpus or u * (2 if cfg_parallel else 1)
    a2a = 4 * shard * cfg.dim * 2 * (u - 1) / u * cfg.num_layers * calls
    gather = shard * cfg.dim * 4 * (u - 1) * calls  # ring all-gather of the blocks' output (fp32): U-1 shards
    fsdp = dit_params(cfg) * 2 * (gpus - 1) / gpus * calls if dit_fsdp else 0  # its rows to every other rank
    cfg_gather = 16 * latent[0] * latent[1] * latent[2] * 4 if cfg_parallel else 0
    flops = dit_forward_flops(cfg, latent) * calls / u
    return {"tokens": n, "ulysses": u, "cfg_parallel": cfg_parallel, "gpus": gpus, "flops_per_rank": flops,
            "bytes_all_to_all": a2a, "bytes_all_gather": gather, "bytes_fsdp": fsdp, "bytes_cfg": cfg_gather,
            "bytes_total": a2a + gather + fsdp + cfg_gather}


def cost_model(task: str = "flf2v-14B", width: int = 1280, height: int = 720, frames: int = 81,
               steps: int = 50) -> dict:
    from flf2v.bench.cost import GPUS, floors, video_costs
    from flf2v.models.config import get_preset
    preset = get_preset(task)
    h100 = GPUS["H100"]
    stages = floors(video_costs(preset, width, height, frames, steps))
    rest = sum(stages[s]["H100 bf16"] for s in ("text_encoder", "image_encoder", "vae_encode", "vae_decode"))
    rows = []
    for gpus, layouts in LAYOUTS.items():
        for u, cfgp in layouts:
            for fsdp in (False, True) if gpus > 1 else (False,):
                c = comm_per_step(preset, width, height, frames, u, cfgp, fsdp)
                compute = c["flops_per_rank"] / h100.bf16
                row = dict(c, dit_fsdp=fsdp, compute_floor_s=compute,
                           compute_target_s=compute / TARGET_EFFICIENCY,
                           comm_nvlink_s=c["bytes_total"] / NVLINK, comm_pcie_s=c["bytes_total"] / PCIE)
                row["step_nvlink_s"] = row["compute_target_s"] + row["comm_nvlink_s"]
                row["step_pcie_s"] = row["compute_target_s"] + row["comm_pcie_s"]
                row["end_to_end_nvlink_s"] = steps * row["step_nvlink_s"] + rest / TARGET_EFFICIENCY
                row["end_to_end_pcie_s"] = steps * row["step_pcie_s"] + rest / TARGET_EFFICIENCY
                rows.append(row)
    return {"task": task, "size": [width, height], "frames": frames, "steps": steps, "gpu": h100.name,
            "links": {"nvlink_Bps": NVLINK, "pcie_Bps": PCIE}, "target_efficiency": TARGET_EFFICIENCY,
            "other_stages_floor_s": rest, "rows": rows}


# ---- measured: one launch per layout -------------------------------------------------------------------

def measure(args) -> None:
    """Inside one process of a layout (torchrun or plain): one warm-up run and one timed run; rank 0
    writes {"step_s", "dit_s", "other_s", ...} to args.result."""
    import torch

    from flf2v.runtime import parallel as P
    from flf2v.runtime.media import load_image
    from flf2v.runtime.pipeline import Pipeline
    par = P.init(args.ulysses, args.cfg_parallel, torch.device("cpu"))
    pipe = Pipeline.from_checkpoint(args.ckpt, parallel=par, **({"dit_fsdp": True} if args.dit_fsdp else {}))
    dit_s = [0.0]
    for name in ("denoise", "denoise_full"):
        fn = getattr(pipe.backend, name)

        def timed(*a, fn=fn):
            t0 = time.perf_counter()
            out = fn(*a)
            dit_s[0] += time.perf_counter() - t0
            return out
        setattr(pipe.backend, name, timed)
    gather_s = [0.0]
    if par is not None and par.cfg is not None:  # CFG-parallel's all-gather, waiting for the other branch included
        gather = par.cfg.gather

        def timed_gather(*a):
            t0 = time.perf_counter()
            gather(*a)
            gather_s[0] += time.perf_counter() - t0
        par.cfg.gather = timed_gather
    frames = [load_image(Path(args.frames) / n) for n in ("first.png", "last.png")]
    kw = dict(seed=1, sample_steps=args.steps, progress=False, output="latent")
    pipe.generate("a ball", *frames, **kw)  # warm-up
    dit_s[0] = gather_s[0] = 0.0
    pipe.generate("a ball", *frames, **kw)
    step, n = pipe.times.seconds["denoise"] / args.steps, args.steps
    if par is None or par.is_main:
        Path(args.result).write_text(json.dumps({
            "step_s": step, "dit_s": dit_s[0] / n, "other_s": step - dit_s[0] / n, "gather_s": gather_s[0] / n,
            "processes": 1 if par is None else par.world}))
    P.shutdown()


def run_layouts(ckpt: Path, frames: Path, work: Path, steps: int) -> list[dict]:
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, n, extra in (("1 process", 1, []), ("CFG-parallel 2", 2, ["--cfg_parallel"]),
                           ("Ulysses 2", 2, ["--ulysses", "2"]), ("Ulysses 2, DiT FSDP", 2, ["--ulysses", "2",
                                                                                            "--dit_fsdp"])):
        result = work / f"parallel-{n}-{'-'.join(extra) or 'single'}.json"
        cmd = [sys.executable, "-m", "flf2v.bench.parallel", "measure", "--ckpt", str(ckpt), "--frames",
               str(frames), "--result", str(result), "--steps", str(steps), *extra]
        if n > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   "-m", "flf2v.bench.parallel", *cmd[3:]]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(f"{name}: {' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
        rows.append({"layout": name, **json.loads(result.read_text())})
    return rows


def markdown(model: dict, measured: list[dict], machine: dict, preset: str, steps: int, load) -> str:
    gb = 1e9
    lines = ["# Multi-process runs: cost model and measured overhead", "",
             f"## Cost model: {model['task']} {model['size'][0]}x{model['size'][1]}, {model['frames']} frames, "
             f"{model['steps']} steps + CFG, {model['gpu']} (paper)", "",
             f"Compute per rank = DiT FLOPs / U at peak, divided by the efficiency the single-GPU target implies "
             f"({model['target_efficiency']:.2f}); communication not overlapped (upper bound); encoders and VAE "
             f"replicated on every GPU ({model['other_stages_floor_s']:.1f} s floor).", "",
             "| GPUs | layout | DiT FSDP | GB sent / rank / step | compute / step | comm NVLink | comm PCIe | "
             "end to end NVLink | end to end PCIe |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in model["rows"]:
        lay = (f"CFG 2 x Ulysses {r['ulysses']}" if r["cfg_parallel"] else f"Ulysses {r['ulysses']}") \
            if r["gpus"] > 1 else "one GPU"
        lines.append(f"| {r['gpus']} | {lay} | {'yes' if r['dit_fsdp'] else 'no'} | {r['bytes_total'] / gb:.2f} | "
                     f"{r['compute_target_s']:.2f} s | {r['comm_nvlink_s']:.3f} s | {r['comm_pcie_s']:.2f} s | "
                     f"{r['end_to_end_nvlink_s']:.0f} s | {r['end_to_end_pcie_s']:.0f} s |")
    o = model.get("official")
    if o:
        lines += ["", f"Against the official code: {o['seconds']} s on 8x H100 ({o['task']} "
                      f"{o['size'][0]}x{o['size'][1]}, {o['steps']} steps); this model at {o['steps']} steps: "
                      f"{o['ours_s']:.0f} s (CFG 2 x Ulysses 4, NVLink), {o['ours_1gpu_s']:.0f} s on one GPU."]
    cpu = machine.get("description", "?")
    lines += ["", f"## Measured: `{preset}` on this machine", "",
              f"{cpu}; gloo over loopback; OMP_NUM_THREADS=1 per process; {steps} UniPC steps with CFG, one timed "
              f"run after a warm-up per layout, each layout its own launch (`torchrun --standalone`); load average "
              f"{load[0]:.2f} before, {load[1]:.2f} after. \"DiT calls\" hold Ulysses' and FSDP's collectives; "
              "\"outside the DiT\" is the guidance, the sampler update and, with CFG-parallel, the all-gather of "
              "the velocities, which includes waiting for the other branch's DiT call to finish.", "",
              "| layout | processes | step | DiT calls | outside the DiT | of it, CFG all-gather | outside, % of step |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in measured:
        lines.append(f"| {r['layout']} | {r['processes']} | {r['step_s'] * 1e3:.1f} ms | {r['dit_s'] * 1e3:.1f} ms | "
                     f"{r['other_s'] * 1e3:.2f} ms | {r.get('gather_s', 0) * 1e3:.2f} ms | "
                     f"{100 * r['other_s'] / r['step_s']:.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["measure"]:
        ap = argparse.ArgumentParser(prog="flf2v.bench.parallel measure")
        for a in ("--ckpt", "--frames", "--result"):
            ap.add_argument(a, required=True)
        ap.add_argument("--steps", type=int, default=4)
        ap.add_argument("--ulysses", type=int, default=1)
        ap.add_argument("--cfg_parallel", action="store_true")
        ap.add_argument("--dit_fsdp", action="store_true")
        measure(ap.parse_args(argv[1:]))
        return 0
    ap = argparse.ArgumentParser(prog="flf2v-bench parallel")
    ap.add_argument("--preset", default="tiny-4h")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)
    from flf2v.bench.cli import _load_avg
    from flf2v.bench.report import machine_info, side_study, write_side_study
    from flf2v.models.make_tiny import write_demo_frames
    model = cost_model()
    i2v = cost_model("i2v-14B", steps=OFFICIAL_8X["steps"])
    pick = lambda m, g: next(r for r in m["rows"] if r["gpus"] == g and not r["dit_fsdp"]  # noqa: E731
                             and (r["cfg_parallel"] or g == 1))
    model["official"] = dict(OFFICIAL_8X, ours_s=pick(i2v, 8)["end_to_end_nvlink_s"],
                             ours_1gpu_s=pick(i2v, 1)["end_to_end_nvlink_s"])
    with side_study("parallel", args.preset, args.work) as (work, ckpt):
        frames = write_demo_frames(work / "frames")[0].parent
        before = (_load_avg() or [0.0])[0]
        measured = run_layouts(ckpt, frames, work, args.steps)
        load = (before, (_load_avg() or [0.0])[0])
    machine = machine_info()
    result = {"cost_model": model, "measured": measured, "preset": args.preset, "steps": args.steps,
              "machine": machine, "load": load, "date": time.strftime("%Y-%m-%d")}
    write_side_study(args.out, "parallel", args.preset, machine, result, markdown(model, measured, machine,
                                                                                   args.preset, args.steps, load))
    return 0


if __name__ == "__main__":
    sys.exit(main())
