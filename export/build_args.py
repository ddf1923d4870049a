"""`flf2v-build`'s flags and the checks of --out (export/build.py builds)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from flf2v.models.layouts import add_checkpoint_flags, is_checkpoint, quoted_home
from flf2v.models.quant import QUANTS

from . import contracts as C
from .plugins import ATTENTION


class BuildError(RuntimeError):
    """A user mistake (bad checkpoint, preset, backend or precision): one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flf2v-build", usage=argparse.SUPPRESS,  # errors: one line, exit 2
                                 description="Export a Wan2.1 checkpoint to ONNX and build engines.")
    add_checkpoint_flags(ap.add_argument)
    ap.add_argument("--preset", default=None,
                    help="engine shape: dynamic (the default: every official size, first-frame aspect ratios "
                         "1:2.4..2.4:1, 5..81 frames), dynamic-480p (the 480p area only), or a static shape: "
                         "720p, 720p-portrait, 480p, 480p-portrait, 1024-square or <W>x<H>x<frames>")
    ap.add_argument("--precision", default=None, choices=C.PRECISIONS,
                    help="graph precision (default: bf16 for TensorRT and AOTInductor on a GPU, fp32 for ONNX "
                         "Runtime and AOTInductor on a CPU)")
    ap.add_argument("--out", default=None, help="engine folder (default: engines/<target tag>/<build key>/<shape>, "
                                                "e.g. engines/h100-sm90-trt11.4/flf2v-14B-bf16-3f9a2c1b/dynamic)")
    ap.add_argument("--backend", default="auto", choices=("auto", "ort", "trt", "aoti"),
                    help="auto: TensorRT where it imports with a GPU, else ONNX Runtime; aoti: PyTorch's "
                         "AOTInductor packages (.pt2), on a GPU or a CPU")
    ap.add_argument("--opt_level", type=int, default=3, choices=range(6),
                    help="TensorRT builder optimization level (default: 3)")
    ap.add_argument("--cfg_batch", default="2", choices=("1", "2", "both"),
                    help="DiT engines to build: batch 2 (CFG as one batch, the default layout), batch 1 (two "
                         "forwards per step), or both (for the 14B each DiT engine costs ~33 GB of disk for "
                         "its ONNX and as much for the engine, and its own build)")
    ap.add_argument("--graphs", default=None, help="comma-separated subset of the graphs to build")
    ap.add_argument("--attention", default="onnx", choices=ATTENTION,
                    help="DiT attention: the backend's own (onnx) or the fused Triton kernels (plugin, CUDA GPU: "
                         "TensorRT plugins, or compiled into AOTI packages; default folder "
                         "engines/<target tag>-plugin/<build key>/<shape>), or the 8-bit Triton self-attention "
                         "(sage: TensorRT plugin or AOTI packages on a CUDA GPU, engines/<target tag>-sage/...)")
    ap.add_argument("--quant", default="none", choices=QUANTS,
                    help="fp8: the DiT's block linears in FP8 e4m3 (per-channel weight scales, dynamic per-token "
                         "activation scales; TensorRT on sm89+, AOTInductor, ONNX Runtime on the CPU)")
    ap.add_argument("--weight_streaming", action="store_true",
                    help="a DiT whose weights stream from host memory as flf2v-run's memory plan sets (24-48 GB "
                         "cards; make engines STREAM=1): TensorRT weight streaming, or aoti block packages")
    ap.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                    help="a LoRA (safetensors) merged into the DiT at export, scale 1 unless given; repeatable. "
                         "The manifest records each one's fingerprint and scale; ONNX Runtime engines can swap "
                         "LoRAs at run time without a rebuild (flf2v-run --lora)")
    ap.add_argument("--force", action="store_true", help="rebuild the graphs asked for even when current (a "
                    "damaged file of the right size), and replace another build's engines (model, checkpoint, "
                    "precision, attention, shape, LoRAs) in --out")
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="no progress bar, and of the log only errors (warnings about the build are still said)")
    ap.add_argument("-v", "--verbose", action="count", default=0,
                    help="log what runs to stderr: -v the steps, -vv debug detail too")
    return ap


def check_out(out, ckpt_dir: Path) -> None:
    """--out can take this build's engines, checked before the checkpoint's fingerprint (seconds)."""
    if str(out) == "":  # an unset shell variable: the default folder was built unasked
        raise BuildError("--out is empty; give a folder or drop the flag")
    folder = Path(out)
    check_inside(folder, ckpt_dir)
    if why := quoted_home(out):
        raise BuildError(f"--out {out}: {why}")
    if folder.exists() and not folder.is_dir():
        raise BuildError(f"--out {folder} is a file; give a folder")
    if is_checkpoint(folder):  # the engines' files were mixed with the weights
        raise BuildError(f"--out {folder} is a checkpoint folder; engines go in a folder of their own: leave out "
                         f"--out (ENGINES=) or give another folder")


def check_inside(folder: Path, ckpt_dir: Path) -> None:
    # the weights' folders are the user's downloads: also those of the files a view of --dit, --t5, ... links to
    homes = {ckpt_dir.resolve(), *(Path(os.path.realpath(f)).parent for f in ckpt_dir.glob("*"))}
    if (inside := next((h for h in homes if h in folder.resolve().parents), None)) is not None:
        raise BuildError(f"--out {folder} is inside the checkpoint folder {inside}; engines go in a folder of their "
                         f"own: give another --out (ENGINES=)")
