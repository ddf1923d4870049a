"""`flf2v-bench memory [--preset small] [--steps 2] [--aoti]`: the memory plans (runtime/memory_plan.py) side by
side (README "Memory plans"). 1. The FLF2V-14B plan per card (24/32/48/80 GiB, 64 GiB host), size (720p, 480p;
81 frames) and precision (bf16, fp8): device GiB per stage, host GiB. 2. The 720p 50-step + CFG denoise time on a
24 GB RTX 4090 (cost model: the DiT's floor plus the part of each streamed block's PCIe copy its compute does not
hide). 3. Each plan run here on --preset (random weights, fp32, --steps steps + CFG): seconds, the bytes held on
the compute device per stage, the video against the resident run's. 4. The 14B VAE decode's GiB per latent tile
(720p, 81 frames, bf16) and the seams of --preset's tiled decode (PSNR, max abs). 5. With --aoti: the batch-2 DiT
step as one AOTInductor package and as STREAM=1's packages: build seconds, step time with all blocks resident
and none, outputs against the whole package's.
"""
from __future__ import annotations

import itertools
import shutil
import statistics
import time

import torch

from flf2v.models import checkpoint as ck
from flf2v.models.config import get_preset
from flf2v.runtime import memory_plan as M

from .cache import psnr
from .cost import GPU, dit_cost
from .measure import run_module, timed
from .report import Report, table

CARDS, SIZES = (24, 32, 48, 80), ((720, 1280), (480, 832))
RTX4090 = GPU("RTX 4090", 165e12, 330e12, 1.008e12, 24e9)  # dense fp16/bf16 with fp32 accumulate, data sheet
PCIE = 25e9  # bytes/s host -> device, PCIe Gen4 x16 in practice
LIGHTX2V_4090 = "2169-2473 s end to end, 720p I2V-14B, FP8 + block offload, 18-23 GB (LightX2V's published table)"


def add_args(ap) -> None:
    ap.add_argument("--preset", default="small", choices=("tiny", "small"), help="the model measured in part 3")
    ap.add_argument("--steps", type=int, default=2, help="denoising steps of the measured runs")
    ap.add_argument("--aoti", action="store_true", help="part 5: the AOTInductor DiT step whole and streamed "
                                                        "(compiles it twice: minutes)")


def plans_14b() -> list[dict]:
    out = []
    for quant, (h, w), card in itertools.product(("none", "fp8"), SIZES, CARDS):
        row = {"quant": quant, "size": f"{w}x{h}", "card_gib": card}
        try:
            row |= M.choose(M.Video(get_preset("flf2v-14B"), h, w, 81, 2, quant), card * M.GiB,
                            host_bytes=64 * M.GiB).to_json()
        except M.InputError as e:
            row["error"] = str(e)
        out.append(row)
    return out


def time_24gb(quant: str) -> dict:
    """Cost-model denoise seconds at 720p/81 frames, 50 steps + CFG, on a 4090 under its 24 GiB plan."""
    preset = get_preset("flf2v-14B")
    video = M.Video(preset, 720, 1280, 81, 2, quant)
    plan = M.choose(video, 24 * M.GiB, host_bytes=64 * M.GiB)
    calls, n = 50 * (2 if plan.cfg_batch == 1 else 1), preset.dit.num_layers
    per_call = dit_cost(preset.dit, video.latent, calls=plan.cfg_batch).floor(RTX4090, "fp8" if quant == "fp8"
                                                                                else "bf16")  # one batch
    block_s, copy_s = per_call / n, M.sizes.dit_block_bytes(preset.dit, 2, quant) / PCIE
    streamed = n - plan.blocks if plan.blocks is not None else 0
    exposed = streamed * max(0.0, copy_s - block_s)
    return {"quant": quant, "plan": plan.name, "dit_call_floor_s": round(per_call, 2), "block_compute_s":
            round(block_s, 4), "block_copy_s": round(copy_s, 4), "streamed_blocks": streamed,
            "denoise_s": round(calls * (per_call + exposed), 0), "copy_exposed_per_call_s": round(exposed, 3)}


def measured(s, preset_name: str, steps: int) -> list[dict]:
    from flf2v.models.make_tiny import write_demo_frames
    from flf2v.runtime.media import load_image
    from flf2v.runtime.pipeline import Pipeline
    from flf2v.runtime.torch_backend import TorchBackend
    ckpt = s.checkpoint(preset_name)
    preset = ck.preset_for(ckpt)
    first, last = (load_image(p) for p in write_demo_frames(s.work / "frames"))
    rows, ref = [], None
    s.settle()
    for plan in (None, M.Plan(offload_model=True), M.Plan(offload_model=True, t5_cpu=True),
                 M.Plan(blocks=preset.dit.num_layers // 2), M.Plan(offload_model=True, t5_cpu=True, blocks=0)):
        backend = TorchBackend(ckpt, preset, plan=plan)
        seen, stage = {}, [None]
        hook = torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, o: stage[0] and seen.__setitem__(stage[0], max(seen.get(stage[0], 0),
                                                                        sum(backend.device_bytes().values()))))
        pipe = Pipeline(backend, ck.load_tokenizer(ckpt, preset), preset)
        t0 = time.perf_counter()
        for name, method in zip(M.STAGES, ("encode_text", "encode_image", "vae_encode", "denoise", "vae_decode")):
            setattr(backend, method, _staged(getattr(backend, method), name, stage))
        video = pipe.generate("a cat", first, last, seed=3, progress=False, sample_steps=steps)
        seconds = time.perf_counter() - t0
        hook.remove()
        ref = video if ref is None else ref
        rows.append({"plan": plan.name if plan else "resident (no plan)", "seconds": round(seconds, 2),
                     "denoise_s": round(pipe.times.seconds["denoise"], 2), "device_bytes": seen,
                     "max_abs_vs_resident": (video - ref).abs().max().item()})
    return rows


def _staged(fn, name, stage):
    def call(*a, **k):
        stage[0] = name
        try:
            return fn(*a, **k)
        finally:
            stage[0] = None
    return call


def vae_tiles(s, preset_name: str) -> dict:
    """Part 4: the 14B decode stage's GiB at 720p/81 frames per tile; the preset VAE's seams per tile."""
    vae14 = get_preset("flf2v-14B").vae
    peak = [{"tile": t, "gib": M.sizes.vae_decode_bytes(vae14, 90, 160, 81, 2, t) / M.GiB}
            for t in (None, *M.TILES)]
    vae = ck.load(s.checkpoint(preset_name), "vae")
    z = torch.randn(1, vae.cfg.z_dim, 2, 40, 24, generator=torch.Generator().manual_seed(0))  # 320x192, 5 frames
    with torch.no_grad():
        ref = vae.decode(z)
        seams = []
        for tile in (32, 24, 16):  # 32 and 16 do not divide the 40-pixel side
            out = vae.decode(z, tile=tile, overlap=M.TILE_OVERLAP)
            seams.append({"tile": tile, "max_abs": (out - ref).abs().max().item(), "psnr_db": psnr(out, ref)})
    return {"decode_720p": peak, "seams": seams, "seam_latent": list(z.shape[2:])}


def aoti_streamed(s, preset_name: str, reps: int = 5) -> dict:
    """Part 5: the DiT step (dit_b2, the preset's first static shape) as a whole package and streamed."""
    from flf2v.export import contracts as C
    from flf2v.runtime.aoti_backend import AotiBackend
    ckpt = s.checkpoint(preset_name)
    preset = ck.preset_for(ckpt)
    shape = next(iter(C.engine_shapes(preset).values()))
    graph = C.get_graph(preset, shape, "fp32", "dit_b2")
    inputs, out = C.sample_inputs(graph, seed=1), {"shape": shape.name, "tokens": M.Video(
        preset, shape.height, shape.width, shape.frame_num).tokens, "blocks": preset.dit.num_layers}
    runs, whole, streamed = {}, s.work / f"aoti-{preset_name}", s.work / f"aoti-stream-{preset_name}"
    build = ("flf2v.export.build", "--ckpt_dir", str(ckpt), "--backend", "aoti", "--precision", "fp32", "--preset",
             shape.name, "--quiet", "--out")
    run_module(*build, str(whole))  # the whole folder (a backend opens complete folders only)
    shutil.rmtree(streamed, ignore_errors=True)
    shutil.copytree(whole, streamed)  # and its DiT step rebuilt streamed, the other packages still current
    out["streamed_build_s"] = round(run_module(*build, str(streamed), "--graphs", "dit_b2", "--weight_streaming",
                                               "--force"), 1)
    for name, folder, resident in (("whole", whole, None), ("streamed", streamed, None),
                                   ("streamed, 0 resident", streamed, 0)):
        backend = AotiBackend(folder, ckpt, preset, resident_blocks=resident)
        runs[name] = backend._run("dit_b2", inputs)  # warm-up: packages loaded, blocks read
        times = [timed(lambda: backend._run("dit_b2", inputs))[0] for _ in range(reps)]
        out[f"{name}_step_s"] = round(statistics.median(times), 4)
    for name in ("streamed", "streamed, 0 resident"):
        out[f"{name}_max_abs_vs_whole"] = max((a - b).abs().max().item() for a, b in zip(runs[name], runs["whole"]))
    return out


def run(s) -> Report:
    a = s.args
    r = {"plans_14b": plans_14b(), "rtx4090_720p": [time_24gb(q) for q in ("none", "fp8")],
         "lightx2v_4090": LIGHTX2V_4090, "measured": measured(s, a.preset, a.steps), "steps": a.steps,
         "vae_tiles": vae_tiles(s, a.preset)}
    if a.aoti:
        r["aoti_streamed"] = aoti_streamed(s, a.preset)
    gib = lambda d, k: f"{d[k] / M.GiB:.1f}" if k in d else ""  # noqa: E731
    v = r["vae_tiles"]
    body = [
        "## 1. FLF2V-14B, 81 frames, 64 GiB host: the plan per card (device GiB at each stage's peak)", "",
        *table(["weights", "size", "card GiB", "plan", *M.STAGES, "host GiB"],
               [[p["quant"], p["size"], p["card_gib"], p.get("name", p.get("error", "")),
                 *(gib(p.get("device_bytes", {}), k) for k in M.STAGES), gib(p, "host_bytes")] for p in r["plans_14b"]],
               left=4), "",
        "## 2. Expected 720p, 50 steps + CFG, denoise on a 24 GB RTX 4090 (cost model, not measured)", "",
        *table(["weights", "plan", "DiT call floor s", "block compute s", "block copy s", "streamed", "denoise s"],
               [[t[k] for k in ("quant", "plan", "dit_call_floor_s", "block_compute_s", "block_copy_s",
                                "streamed_blocks", "denoise_s")] for t in r["rtx4090_720p"]], left=2), "",
        f"LightX2V on a 4090: {r['lightx2v_4090']}.", "",
        f"## 3. Measured here: `{a.preset}`, fp32, {a.steps} steps + CFG (device bytes: MiB the plan keeps on the "
        f"compute device)", "",
        *table(["plan", "run s", "denoise s", *M.STAGES, "max abs vs resident"],
               [[m["plan"], m["seconds"], m["denoise_s"], *(f"{m['device_bytes'].get(k, 0) / 2**20:.1f}"
                                                            for k in M.STAGES),
                 f"{m['max_abs_vs_resident']:.1e}"] for m in r["measured"]]), "",
        f"## 4. VAE decode by latent tile (overlap 8): 14B at 720p/81 frames, bf16 (model); seams measured here on "
        f"`{a.preset}`'s VAE (random weights), latent {v['seam_latent']}", "",
        *table(["tile", "720p decode GiB"],
               [[t["tile"] or "whole (90x160)", f"{t['gib']:.1f}"] for t in v["decode_720p"]]),
        "", *table(["tile", "PSNR dB vs untiled", "max abs"],
                   [[t["tile"], f"{t['psnr_db']:.1f}", f"{t['max_abs']:.3f}"] for t in v["seams"]])]
    if a.aoti:
        t = r["aoti_streamed"]
        body += ["", f"## 5. AOTInductor DiT step (`dit_b2`, {t['shape']}: {t['tokens']} tokens, {t['blocks']} "
                 f"blocks), fp32, whole package vs STREAM=1 (median of 5 after a warm-up)", "",
                 *table(["packages", "build s", "step s", "max abs vs whole"],
                        [["whole", "-", t["whole_step_s"], "-"],
                         ["streamed, all resident", t["streamed_build_s"], t["streamed_step_s"],
                          f"{t['streamed_max_abs_vs_whole']:.1e}"],
                         ["streamed, 0 resident", "-", t["streamed, 0 resident_step_s"],
                          f"{t['streamed, 0 resident_max_abs_vs_whole']:.1e}"]])]
    return Report("memory plans", r, body)
