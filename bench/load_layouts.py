"""`flf2v-bench load-layouts [--layers 4] [--model flf2v-14B] [--keep]`: seconds and peak anonymous RSS of
loading the DiT as bf16 from each checkpoint layout (README "Checkpoints", load cost per layout): the full-width
DiT cut to --layers blocks, random weights, written as official and diffusers fp32 shards and ComfyUI bf16 and
fp8 files, each loaded in a fresh process through flf2v-run's loader with RssAnon sampled every 10 ms (see
export_memory). `ratio`: the load's growth of RssAnon over its bf16 weight bytes (target <= 1.1).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from flf2v.models import checkpoint as ck
from flf2v.models.config import PRESETS, get_preset
from flf2v.models.keymaps import dit_key_to_diffusers
from flf2v.models.make_tiny import write_tiny_checkpoint

from .export_memory import PeakRssAnon, dit_shapes, lazy_source, write_shards
from .measure import run_module, timed
from .report import Report, table

COMFY_PREFIX = "model.diffusion_model."
# layout -> (stored dtype, file name pattern); what each layout's owners publish for the 14B DiT
LAYOUTS = {"official": (torch.float32, "diffusion_pytorch_model-*-of-*.safetensors"),
           "diffusers": (torch.float32, "transformer/diffusion_pytorch_model-*-of-*.safetensors"),
           "comfyui-bf16": (torch.bfloat16, "wan2.1_flf2v_720p_14B_bf16.safetensors"),
           "comfyui-fp8": (torch.float8_e4m3fn, "wan2.1_flf2v_720p_14B_fp8_e4m3fn.safetensors")}


def add_args(ap) -> None:
    ap.add_argument("--model", default="flf2v-14B", choices=sorted(PRESETS),
                    help="the preset whose full-width DiT is cut (default flf2v-14B)")
    ap.add_argument("--layers", type=int, default=4, help="DiT blocks kept (the full 14B has 40)")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")


def cut_preset(model: str, layers: int):
    p = get_preset(model)
    return dataclasses.replace(p, dit=dataclasses.replace(p.dit, num_layers=layers))


def write_layouts(work: Path, preset) -> dict[str, Path]:
    """The cut DiT of `preset` in every layout of LAYOUTS (same random values), each folder complete: the
    other networks are the tiny preset's (official folder and its diffusers copy)."""
    from .diffusers_peer import build_pipeline
    tiny, tiny_diffusers = write_tiny_checkpoint(work / "tiny-official", "tiny", seed=0), work / "tiny-diffusers"
    build_pipeline(tiny).save_pretrained(tiny_diffusers)
    shapes, cfg = dit_shapes(preset.dit), preset.dit
    out = {name: work / name for name in LAYOUTS}
    for d in out.values():
        d.mkdir(parents=True)

    write_shards(out["official"], cfg.to_json_dict(), shapes)
    for f in tiny.iterdir():
        if f.name != ck.DIT_CONFIG and not f.name.startswith("diffusion_pytorch_model"):
            (out["official"] / f.name).symlink_to(f)

    write_shards(out["diffusers"] / "transformer", {
        "_class_name": "WanTransformer3DModel", "num_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.dim // cfg.num_heads}, {dit_key_to_diffusers(k): s for k, s in shapes.items()})
    for f in tiny_diffusers.iterdir():
        if f.name != "transformer":
            (out["diffusers"] / f.name).symlink_to(f)

    vae = {k: g() for k, g in ck.pth_tensor_source(tiny / ck.VAE_FILE).items()}
    for name in ("comfyui-bf16", "comfyui-fp8"):
        dtype, file = LAYOUTS[name]
        save_file({COMFY_PREFIX + k: g().to(dtype) for k, g in lazy_source(shapes).items()}, out[name] / file)
        save_file(vae, out[name] / "wan_2.1_vae.safetensors")
        for sub, file in (("text_encoder", "umt5_xxl_fp16"), ("image_encoder", "clip_vision_h")):
            (out[name] / f"{file}.safetensors").symlink_to(next((tiny_diffusers / sub).glob("*.safetensors")))
    return out


def run(s) -> Report:
    a = s.args
    preset = cut_preset(a.model, a.layers)
    work = Path(tempfile.mkdtemp(prefix="load-layouts-", dir=s.work))
    try:
        folders = write_layouts(work, preset)
        s.settle()
        for name, d in folders.items():  # each load in a fresh process: main below
            run_module("flf2v.bench.load_layouts", str(d), a.model, str(a.layers), str(work / f"{name}.json"))
        got = {name: json.loads((work / f"{name}.json").read_text()) for name in folders}
        sizes = {name: sum(f.stat().st_size for f in d.glob(LAYOUTS[name][1])) for name, d in folders.items()}
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {"model": a.model, "layers": a.layers, "layouts": got}
    for name, r in got.items():
        r |= {"stored": str(LAYOUTS[name][0]).removeprefix("torch."), "file_bytes": sizes[name],
              "ratio": round((r["rss_peak"] - r["rss_start"]) / r["weight_bytes"], 3),
              "same_weights_as_official": r["checksum"] == got["official"]["checksum"]}
    gib = next(iter(got.values()))["weight_bytes"] / 2**30
    return Report("DiT load per checkpoint layout (bf16)", result, [
        f"DiT of {a.model}, full width, {a.layers} blocks: {gib:.2f} GiB of bf16 weights.", "",
        *table(["layout", "stored", "file GB", "load s", "RssAnon before GiB", "peak growth GiB", "ratio",
                "same bf16 weights"],
               [[name, r["stored"], f"{sizes[name] / 1e9:.2f}", f"{r['seconds']:.2f}", f"{r['rss_start'] / 2**30:.2f}",
                 f"{(r['rss_peak'] - r['rss_start']) / 2**30:.2f}", f"{r['ratio']:.3f}",
                 "yes" if r["same_weights_as_official"] else "no"] for name, r in got.items()])])


def main(argv: list[str]) -> int:
    """The child: load the DiT of `folder` once as bf16, write its seconds, RssAnon and weights' checksum."""
    from flf2v.models import dit, renamed  # noqa: F401  imported before the clock starts
    from flf2v.models.lora import load_dit
    folder, model, layers, out = argv
    preset = cut_preset(model, int(layers))
    with PeakRssAnon() as m:
        seconds, net = timed(lambda: load_dit(folder, torch.bfloat16, preset))
    sd = net.state_dict()
    Path(out).write_text(json.dumps({"seconds": round(seconds, 3), "rss_start": m.start, "rss_peak": m.peak,
                                     "weight_bytes": sum(v.numel() * v.element_size() for v in sd.values()),
                                     "checksum": sum(v.sum(dtype=torch.float64).item() for v in sd.values())}))
    return 0
