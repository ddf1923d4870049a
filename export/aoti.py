"""PyTorch reference networks -> AOTInductor packages: one `.pt2` per graph of the I/O contracts.

`torch.export` traces the graph's adapter (contracts.module) with the contract's sample inputs (and, for a
dynamic graph, the contract's dims as `torch.export.Dim`s over the shape's ranges, as the ONNX export
does), and `torch._inductor.aoti_compile_and_package` compiles it: C++ kernels on a CPU, Triton kernels
on a GPU, the weights inside the package. No Python model code runs when a package is loaded
(`torch._inductor.aoti_load_package`, runtime/aoti_backend.py). A package holds code for one
device architecture and one torch version: the folder's target tag names both
(`cpu-aoti-torch2.13`, `h100-sm90-aoti-torch2.13`) and the runtime refuses another with the rebuild command.
The package is compiled in a private temporary folder beside the destination and renamed into place, so
a killed build never leaves a package that looks finished.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from flf2v.models import checkpoint as ck
from flf2v.models.lora import load_dit

from .contracts import Graph, module, sample_inputs
from .onnx_export import _dynamic_shapes, _sample_dims


def aoti_device() -> torch.device:
    """Where packages are compiled for and run: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def export_package(graph: Graph, ckpt_dir, path, *, preset=None, loras=(), ranges=None, device=None,
                   attention: str = "onnx", quant: str = "none") -> Path:
    """Compile `graph` of the checkpoint's network into the AOTInductor package `path` (`<graph>.pt2`).
    `ranges` (dynamic graphs): root dim -> (min, max); the other options as `load_net`'s."""
    device = torch.device(device or aoti_device())
    mod = module(graph, {graph.component: load_net(graph, ckpt_dir, preset, loras, device, attention, quant)})
    sample = graph.at(_sample_dims(ranges)) if graph.dynamic else graph
    args = tuple(t.to(device) for t in sample_inputs(sample))
    return compile_package(mod, args, _dynamic_shapes(graph, ranges), path)


def load_net(graph: Graph, ckpt_dir, preset=None, loras=(), device=None, attention: str = "onnx",
             quant: str = "none") -> torch.nn.Module:
    """The network `graph` runs, loaded on `device`. `loras` [(LoRA, scale)] merged into the DiT; `attention`
    (DiT graphs): "onnx", torch's attention compiled by Inductor, or "plugin", the flf2v Triton kernels
    (kernels/ops.py triton_ops) compiled into the package (CUDA only), or "sage", the same with the 8-bit
    self-attention (kernels/sage_attention.py); `quant` "fp8" (DiT graphs but the cached step): the blocks'
    linears as torch._scaled_mm with the FP8 weights (models/quant.py)."""
    device = torch.device(device or aoti_device())
    preset = preset or ck.preset_for(ckpt_dir)
    kw = {}
    if attention in ("plugin", "sage"):
        if graph.component != "dit" or device.type != "cuda":
            raise ValueError(f"attention={attention!r} compiles the Triton kernels into a CUDA DiT package, not "
                             f"{graph.name!r} on {device.type}")
        kw["attention"] = "triton" if attention == "plugin" else "sage"
    if quant != "none" and graph.component == "dit" and not graph.name.startswith("dit_cached"):
        kw["quant"] = quant
    if graph.component == "dit":
        return load_dit(ckpt_dir, graph.compute_dtype, preset, list(loras), **kw).to(device)
    return ck.load(ckpt_dir, graph.component, graph.compute_dtype, preset, **kw).to(device)


def compile_package(mod, args: tuple, dynamic_shapes, path) -> Path:
    """torch.export `mod` at `args` and compile it into the AOTInductor package `path`, in a private temporary
    folder beside it renamed into place (a killed build leaves no package that looks finished)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}.partial-", dir=path.parent))
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            ep = torch.export.export(mod, args, dynamic_shapes=dynamic_shapes)
            out = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp / path.name))
        os.replace(out, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
