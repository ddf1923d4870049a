"""`flf2v-bench parallel [--preset tiny-4h|small] [--steps 8]`: the multi-process run (runtime/parallel.py) on
paper and on this machine (README "Several GPUs").

1. Cost model, 720p / 81 frames: per step and rank, the DiT compute (FLOPs over the ranks at the H100's peak and
   at the single-GPU target's efficiency) and the bytes each rank sends: Ulysses' 4 bf16 all-to-alls per block
   and the final fp32 all-gather, FSDP's bf16 all-gather of each block's weights (--dit_fsdp), CFG-parallel's
   all-gather of the velocity; over NVLink and PCIe Gen5 x16, not overlapped (an upper bound). End to end for
   1, 2, 4, 8 GPUs, next to the official 238.8 s (8x H100, I2V 720p, 40 steps).
2. Measured (gloo over loopback, torchrun per layout, --preset): the denoising loop's seconds per step, the DiT
   calls' part of it (Ulysses' collectives are inside the DiT; CFG-parallel's all-gather is outside), the rest.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from .report import Report, table

log = logging.getLogger("flf2v.bench")

NVLINK, PCIE = 450e9, 64e9  # bytes/s per direction: H100 SXM NVLink 4 (900 GB/s both ways), PCIe Gen5 x16
OFFICIAL_8X = {"seconds": 238.8, "steps": 40, "task": "i2v-14B", "size": (1280, 720), "frames": 81}
TARGET_EFFICIENCY = 662 / 800  # the single-H100 target (800 s) against its floor (662 s)
LAYOUTS = {1: [(1, False)], 2: [(2, False), (1, True)], 4: [(4, False), (2, True)], 8: [(8, False), (4, True)]}
MEASURED = {"1 process": (1, []), "CFG-parallel 2": (2, ["cfg_parallel"]), "Ulysses 2": (2, ["ulysses"]),
            "Ulysses 2, DiT FSDP": (2, ["ulysses", "dit_fsdp"])}


def add_args(ap) -> None:
    ap.add_argument("--preset", default="tiny-4h", choices=("tiny", "tiny-4h", "small"),
                    help="model preset of the random checkpoint (default tiny-4h)")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps of each measured run (default 8)")


def comm_per_step(preset, width: int, height: int, frames: int, ulysses: int, cfg_parallel: bool,
                  dit_fsdp: bool = False) -> dict:
    """Bytes one rank sends per denoising step (CFG on: cond + uncond) and its DiT FLOPs."""
    from flf2v.bench.cost import dit_forward_flops, dit_params, dit_tokens
    cfg, u = preset.dit, ulysses
    ss, st = preset.vae.stride[1], preset.vae.stride[0]
    latent = ((frames - 1) // st + 1, height // ss, width // ss)
    n = dit_tokens(cfg, latent)
    shard = -(-n // u)
    calls = 1 if cfg_parallel else 2  # DiT calls per rank per step (batch 1 each, or one batch-2 call)
    gpus = u * (2 if cfg_parallel else 1)
    a2a = 4 * shard * cfg.dim * 2 * (u - 1) / u * cfg.num_layers * calls
    gather = shard * cfg.dim * 4 * (u - 1) * calls  # ring all-gather of the blocks' output (fp32): U-1 shards
    fsdp = dit_params(cfg) * 2 * (gpus - 1) / gpus * calls if dit_fsdp else 0  # its rows to every other rank
    cfg_gather = 16 * latent[0] * latent[1] * latent[2] * 4 if cfg_parallel else 0
    return {"tokens": n, "ulysses": u, "cfg_parallel": cfg_parallel, "gpus": gpus,
            "flops_per_rank": dit_forward_flops(cfg, latent) * calls / u, "bytes_all_to_all": a2a,
            "bytes_all_gather": gather, "bytes_fsdp": fsdp, "bytes_cfg": cfg_gather,
            "bytes_total": a2a + gather + fsdp + cfg_gather}


def cost_model(task: str = "flf2v-14B", width: int = 1280, height: int = 720, frames: int = 81,
               steps: int = 50) -> dict:
    from flf2v.bench.cost import GPUS, floors, video_costs
    from flf2v.models.config import get_preset
    preset, h100 = get_preset(task), GPUS["H100"]
    stages = floors(video_costs(preset, width, height, frames, steps))
    rest = sum(stages[s]["H100 bf16"] for s in ("text_encoder", "image_encoder", "vae_encode", "vae_decode"))
    rows = []
    for gpus, layouts in LAYOUTS.items():
        for (u, cfgp), fsdp in [(lay, f) for lay in layouts for f in ((False, True) if gpus > 1 else (False,))]:
            c = comm_per_step(preset, width, height, frames, u, cfgp, fsdp)
            floor = c["flops_per_rank"] / h100.bf16
            row = dict(c, dit_fsdp=fsdp, compute_floor_s=floor, compute_target_s=floor / TARGET_EFFICIENCY)
            for link, rate in (("nvlink", NVLINK), ("pcie", PCIE)):
                row[f"comm_{link}_s"] = c["bytes_total"] / rate
                row[f"step_{link}_s"] = row["compute_target_s"] + row[f"comm_{link}_s"]
                row[f"end_to_end_{link}_s"] = steps * row[f"step_{link}_s"] + rest / TARGET_EFFICIENCY
            rows.append(row)
    return {"task": task, "size": [width, height], "frames": frames, "steps": steps, "gpu": h100.name,
            "links": {"nvlink_Bps": NVLINK, "pcie_Bps": PCIE}, "target_efficiency": TARGET_EFFICIENCY,
            "other_stages_floor_s": rest, "rows": rows}


# ---- measured: one launch per layout -------------------------------------------------------------------

def measure(job: dict) -> None:
    """Inside one process of a layout (torchrun or plain; `python -m flf2v.bench.parallel '<job JSON>'`): one
    warm-up run and one timed run; rank 0 writes {"step_s", "dit_s", "other_s", ...} to job["result"]."""
    import torch

    from flf2v.runtime import parallel as P
    from flf2v.runtime.media import load_image
    from flf2v.runtime.pipeline import Pipeline

    from .measure import Probe
    par = P.init(2 if "ulysses" in job["flags"] else 1, "cfg_parallel" in job["flags"], torch.device("cpu"))
    pipe = Pipeline.from_checkpoint(job["ckpt"], parallel=par, **({"dit_fsdp": True} if "dit_fsdp" in job["flags"]
                                                                 else {}))
    meter = Probe(torch.device("cpu"))  # host time inside the calls, no spans
    for name in ("denoise", "denoise_full"):
        setattr(pipe.backend, name, meter.wrap("dit", getattr(pipe.backend, name), span=False))
    if par is not None and par.cfg is not None:  # CFG-parallel's all-gather, waiting for the other branch included
        par.cfg.gather = meter.wrap("gather", par.cfg.gather, span=False)
    frames = [load_image(Path(job["frames"]) / n) for n in ("first.png", "last.png")]
    kw = dict(seed=1, sample_steps=job["steps"], progress=False, output="latent")
    pipe.generate("a ball", *frames, **kw)  # warm-up
    meter.clear()
    pipe.generate("a ball", *frames, **kw)
    n = job["steps"]
    step, dit = pipe.times.seconds["denoise"] / n, meter.calls.get("dit", 0.0) / n
    if par is None or par.is_main:
        Path(job["result"]).write_text(json.dumps({
            "step_s": step, "dit_s": dit, "other_s": step - dit, "gather_s": meter.calls.get("gather", 0.0) / n,
            "processes": 1 if par is None else par.world}))
    del pipe  # FSDP's networks hold the process group (runtime/parallel.py shutdown)
    P.shutdown(par)


def run_layouts(ckpt: Path, frames: Path, work: Path, steps: int) -> list[dict]:
    rows = []
    for name, (n, flags) in MEASURED.items():
        result = work / f"parallel-{n}-{'-'.join(flags) or 'single'}.json"
        job = json.dumps({"ckpt": str(ckpt), "frames": str(frames), "result": str(result), "steps": steps,
                          "flags": flags})
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else []
        cmd = [sys.executable, *launch, "-m", "flf2v.bench.parallel", job]
        result.unlink(missing_ok=True)  # a kept --work's result of an earlier run was read as this one's
        rows.append({"layout": name, **_launch(name, cmd, result)})
    return rows


def _launch(name: str, cmd: list[str], result: Path) -> dict:
    """The layout's measurement; a launch that fails, hangs or writes no result is a row saying so (the report is
    written, exit 1), not a traceback losing the layouts measured before it. A rank that aborts after rank 0
    wrote the result keeps its measurement, the exit noted (gloo's teardown did, under load, until
    runtime/parallel.py shutdown joined its threads)."""
    try:
        r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                           timeout=1800)
        rc, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired as e:  # a hung collective
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        rc = f"timeout ({e.timeout:g} s)"
    if rc == 0 and result.is_file():
        return json.loads(result.read_text())
    why = next((ln.strip()[:200] for ln in err.splitlines() if "terminate called" in ln or "Error" in ln), "")
    said = f"exit {rc}" + (f": {why}" if why else "") if rc != 0 else "exit 0 but no result written"
    log.error("%s: %s: %s\n%s", name, " ".join(cmd), said, err[-3000:])
    if result.is_file():
        return {**json.loads(result.read_text()), "teardown": said, "stderr": err[-2000:]}
    return {"failed": said, "stderr": err[-2000:]}


def run(s):
    from flf2v.models.make_tiny import write_demo_frames
    model, i2v = cost_model(), cost_model("i2v-14B", steps=OFFICIAL_8X["steps"])
    pick = lambda g: next(r for r in i2v["rows"] if r["gpus"] == g and not r["dit_fsdp"]  # noqa: E731
                          and (r["cfg_parallel"] or g == 1))["end_to_end_nvlink_s"]
    model["official"] = o = dict(OFFICIAL_8X, ours_s=pick(8), ours_1gpu_s=pick(1))
    ckpt, frames = s.checkpoint(s.args.preset), write_demo_frames(s.work / "frames")[0].parent
    s.settle()
    r = {"cost_model": model, "steps": s.args.steps, "measured": run_layouts(ckpt, frames, s.work, s.args.steps)}
    lay = lambda c: "one GPU" if c["gpus"] == 1 else (  # noqa: E731
        f"CFG 2 x Ulysses {c['ulysses']}" if c["cfg_parallel"] else f"Ulysses {c['ulysses']}")
    return Report("multi-process runs: cost model and measured overhead", r, [
        f"## Cost model: {model['task']} {model['size'][0]}x{model['size'][1]}, {model['frames']} frames, "
        f"{model['steps']} steps + CFG, {model['gpu']} (paper)", "",
        f"Compute per rank = DiT FLOPs / U at peak, divided by the efficiency the single-GPU target implies "
        f"({model['target_efficiency']:.2f}); communication not overlapped (upper bound); encoders and VAE "
        f"replicated on every GPU ({model['other_stages_floor_s']:.1f} s floor).", "",
        *table(["GPUs", "layout", "DiT FSDP", "GB sent / rank / step", "compute / step", "comm NVLink", "comm PCIe",
                "end to end NVLink", "end to end PCIe"],
               [[c["gpus"], lay(c), "yes" if c["dit_fsdp"] else "no", f"{c['bytes_total'] / 1e9:.2f}",
                 f"{c['compute_target_s']:.2f} s", f"{c['comm_nvlink_s']:.3f} s", f"{c['comm_pcie_s']:.2f} s",
                 f"{c['end_to_end_nvlink_s']:.0f} s", f"{c['end_to_end_pcie_s']:.0f} s"] for c in model["rows"]]), "",
        f"Against the official code: {o['seconds']} s on 8x H100 ({o['task']} {o['size'][0]}x{o['size'][1]}, "
        f"{o['steps']} steps); this model at {o['steps']} steps: {o['ours_s']:.0f} s (CFG 2 x Ulysses 4, "
        f"NVLink), {o['ours_1gpu_s']:.0f} s on one GPU.", "",
        f"## Measured: `{s.args.preset}` on this machine", "",
        f"gloo over loopback; OMP_NUM_THREADS=1 per process; {r['steps']} UniPC steps with CFG, one timed run after "
        f"a warm-up per layout, each layout its own launch (`torchrun --standalone`). \"DiT calls\" hold Ulysses' "
        "and FSDP's collectives; \"outside the DiT\" is the guidance, the sampler update and, with CFG-parallel, "
        "the all-gather of the velocities, which includes waiting for the other branch's DiT call to finish.", "",
        *table(["layout", "processes", "step", "DiT calls", "outside the DiT", "of it, CFG all-gather",
                "outside, % of step"],
               [[m["layout"], m["processes"], f"{m['step_s'] * 1e3:.1f} ms", f"{m['dit_s'] * 1e3:.1f} ms",
                 f"{m['other_s'] * 1e3:.2f} ms", f"{m.get('gather_s', 0) * 1e3:.2f} ms",
                 f"{100 * m['other_s'] / m['step_s']:.1f} %"] if "failed" not in m else
                [m["layout"], f"failed ({m['failed']}; its stderr is in the JSON)", "", "", "", "", ""]
                for m in r["measured"]]),
        *[f"\n{m['layout']}: measured, then a process ended with {m['teardown']} (stderr in the JSON)."
          for m in r["measured"] if "teardown" in m]], failed=[m["layout"] for m in r["measured"] if "failed" in m])


if __name__ == "__main__":
    measure(json.loads(sys.argv[1]))
