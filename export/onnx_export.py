"""PyTorch reference networks -> ONNX (dynamo exporter, opset 23; static, or dynamic latent frames and
grid for the graphs of a dynamic engine folder: contracts.DIMS, `ranges`).

Two routes to the same graph:
- direct: a real module (small networks, or one handed in by a test) is traced with real sample inputs.
- streamed: for networks whose weights exceed `STREAM_BYTES` (the 14B DiT, umT5-XXL, CLIP-H), the network
  is built on the meta device and traced with meta inputs, so no weight is ever materialised; each ONNX
  initializer then gets a lazy tensor that reads its checkpoint tensor and casts it to the graph dtype
  only when the external-data file is written, one tensor at a time. Peak memory is one tensor plus the
  graph structure, whatever the model size. The fixed tables (RoPE, time sinusoid, T5 buckets, VAE
  mean/std) are built real in `__init__` even under meta; their real values are taken before the module
  moves to meta and attached the same way.
DiT graphs take `attention="plugin"` to carry the fused Triton attention as flf2v TensorRT plugin nodes
instead of the standard Attention node (plugins.py). Both routes finish with the exporter's own
optimizer (fusing RMSNormalization etc.), then `passes.clean`, then `passes.check_graph`. Files are
written in a private temporary folder beside the destination and renamed into place, data file first
and graph last, so a killed export never leaves a graph that looks finished.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor, from_torch_dtype
from torch import nn

from flf2v.models import checkpoint as ck
from flf2v.models.config import Preset
from flf2v.models.quant import stored_dtype

from . import passes, plugins, qdq, sage_graph
from .contracts import OPSET, WEIGHT_PREFIX, Graph, module, sample_inputs

STREAM_BYTES = 1 << 30  # networks with more weight bytes (in the graph dtype) take the streamed route
EXTERNAL_BYTES = 1 << 30  # direct exports with more initializer bytes store them as external data


class ExportError(RuntimeError):
    pass


# ---- networks and their checkpoint tensors --------------------------------------------------------

def weight_bytes(net: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the state dict once floating tensors are cast to `dtype` (works on meta modules)."""
    return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
               for t in net.state_dict().values())


# ---- export routes --------------------------------------------------------------------------------

def _dynamic_shapes(graph: Graph, ranges: dict[str, tuple[int, int]] | None):
    """torch.export dynamic_shapes for the adapter's positional inputs: every "k*name" dim of the contract
    becomes k * Dim(name) over `ranges` (root dim -> (min, max)); None for a static graph."""
    if not graph.dynamic:
        return None
    if not ranges:
        raise ExportError(f"{graph.name} has dynamic dims but no ranges were given")
    roots = {n: torch.export.Dim(n, min=lo, max=hi) for n, (lo, hi) in ranges.items()}

    def dims(spec):
        out = {}
        for axis, d in enumerate(spec.shape):
            if isinstance(d, str):
                k, _, n = d.rpartition("*")
                out[axis] = int(k) * roots[n] if k else roots[n]
        return out or None
    specs = [dims(s) for s in graph.inputs]
    # the adapters take (*inputs) (one tuple) or, for VAE steps, (x, *caches)
    return (specs[0], tuple(specs[1:])) if graph.component == "vae" else (tuple(specs),)


def _trace(mod: nn.Module, graph: Graph, args, optimize: bool, attention: str = "onnx",
           ranges: dict[str, tuple[int, int]] | None = None):
    """attention="plugin": the DiT's attention as flf2v TensorRT plugin nodes (see plugins.py). `ranges`:
    the root dims of a dynamic graph (contracts.DIMS) -> (min, max); `args` are sample inputs within them."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision ops
    table = qdq.translation_table()  # an FP8 DiT's linears -> Q/DQ
    if attention in plugins.DIT_ATTENTION:
        plugins.check_triton_attention(mod, attention)
        table.update(sage_graph.translation_table())
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.onnx.export(mod, tuple(args), dynamo=True, opset_version=OPSET, optimize=optimize,
                                 input_names=[s.name for s in graph.inputs],
                                 output_names=[s.name for s in graph.outputs], verbose=False,
                                 custom_translation_table=table, dynamic_shapes=_dynamic_shapes(graph, ranges))


def _name_dims(prog, graph: Graph) -> None:
    """Spell every dynamic dim of the graph's outputs as the contract's root dims. The exporter names an
    input dim such as 2*s45 after its Dim ("2*hp") but leaves a bare s45 as is (the DiT's `hidden` token
    grid [B, T, hp, wp, dim]); the symbols are read off the exported program's inputs."""
    if not graph.dynamic:
        return
    names = {}
    user = [n for n in prog.exported_program.graph.nodes if n.op == "placeholder"
            and n.name in prog.exported_program.graph_signature.user_inputs]
    for spec, node in zip(graph.inputs, user):
        for d, size in zip(spec.shape, node.meta["val"].shape):
            if isinstance(d, str) and isinstance(size, torch.SymInt):
                k, _, root = d.rpartition("*")
                names[str(size.node.expr / (int(k) if k else 1))] = root
    for value in prog.model.graph.outputs:
        dims = [names.get(str(d), d) if isinstance(d, ir.SymbolicDim) else d for d in value.shape]
        value.shape = ir.Shape([str(d) if isinstance(d, ir.SymbolicDim) else d for d in dims])


def _sample_dims(ranges: dict[str, tuple[int, int]] | None) -> dict[str, int]:
    """Root dims of the sample a dynamic graph is traced with: inside the ranges, neither 0 nor 1 (which
    torch.export specialises) and, where the ranges allow, all different (no coincidence to trace in)."""
    out = {}
    for n, (lo, hi) in (ranges or {}).items():
        v = max(lo, 2)
        while v in out.values() and v < hi:
            v += 1
        out[n] = min(v, hi)
    return out


def export_direct(graph: Graph, mod: nn.Module, folder: Path, attention: str = "onnx",
                  ranges: dict[str, tuple[int, int]] | None = None) -> Path:
    """Trace a real adapter module (see `contracts.module`) into folder/<graph>.onnx."""
    sample = graph.at(_sample_dims(ranges)) if graph.dynamic else graph
    prog = _trace(mod, graph, sample_inputs(sample, 0), optimize=True, attention=attention, ranges=ranges)
    _name_dims(prog, graph)
    path = folder / f"{graph.name}.onnx"
    size = sum(v.const_value.nbytes for v in prog.model.graph.initializers.values() if v.const_value is not None)
    prog.save(path, external_data=size > EXTERNAL_BYTES)
    return path


def _to_meta(net: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Move `net` to meta in place: state-dict floats in `dtype` (as `checkpoint.fill` loads them), the
    non-persistent buffers in their own dtype. Returns the real values of those buffers by full name."""
    tables = {}
    for mod_name, mod in net.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in mod._parameters.items():
            if p is not None:
                t = torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype, device="meta")
                mod._parameters[name] = nn.Parameter(t, requires_grad=False)
        for name, b in mod._buffers.items():
            if b is None:
                continue
            if name in mod._non_persistent_buffers_set:
                if b.is_meta:
                    raise ExportError(f"buffer {prefix}{name} is empty under meta; build fixed tables with "
                                      f"device='cpu' in __init__")
                tables[prefix + name] = b.detach().clone()
                mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="meta")
            else:
                mod._buffers[name] = torch.empty(b.shape, dtype=stored_dtype(prefix + name, b.dtype, dtype),
                                                 device="meta")
    return tables


def _lazy(get, key: str, dtype: torch.dtype, shape: tuple[int, ...], origin: str) -> ir.LazyTensor:
    def load() -> TorchTensor:
        t = get()
        if tuple(t.shape) != shape:
            raise ck.CheckpointError(f"{origin}: {key!r} has shape {tuple(t.shape)}, the network needs {shape}")
        return TorchTensor(t.to(dtype).contiguous() if t.is_floating_point() else t.contiguous())
    return ir.LazyTensor(load, dtype=from_torch_dtype(dtype), shape=ir.Shape(shape))


def _is_empty(value: ir.Value) -> bool:
    t = value.const_value
    return t is None or (isinstance(t, TorchTensor) and t.raw.is_meta)


def _optimize_keeping_weights(model: ir.Model) -> None:
    """The exporter's optimizer (`ONNXProgram.optimize`: constant folding, then fusions such as
    RMSNormalization) minus folding any node that reads a streamed weight: by default it folds every
    single-use Transpose of a weight whatever its size, which would hold all the transposed weights in
    memory. Those Transposes stay in the graph; TensorRT folds them when it builds the engine."""
    import onnxscript

    def should_fold(node: ir.Node):
        if any(v is not None and isinstance(v.const_value, ir.LazyTensor) for v in node.inputs):
            return False
        return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)
        onnxscript.rewriter.onnx_fusions.fuse(model)


def export_streamed(graph: Graph, ckpt_dir, preset: Preset, folder: Path, source: dict | None = None,
                    attention: str = "onnx", ranges: dict[str, tuple[int, int]] | None = None,
                    quant: str = "none") -> Path:
    """Export without materialising the weights; they stream from the checkpoint (or `source`:
    key -> getter) into folder/<graph>.onnx.data while the file is written."""
    dtype = graph.compute_dtype
    net = ck.build_meta(ckpt_dir, graph.component, preset, **_network_options(graph, attention, quant))
    source = ck.tensor_source(ckpt_dir, graph.component)[0] if source is None else source
    source = ck.as_quantized(net, source)
    sd = net.state_dict()
    want = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(want) - set(source))
    if missing:
        raise ck.CheckpointError(f"{ckpt_dir}: {graph.component} tensor {missing[0]!r} is missing"
                                 + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    tables = _to_meta(net, dtype)
    mod = module(graph, {graph.component: net})
    sample = graph.at(_sample_dims(ranges)) if graph.dynamic else graph
    args = [torch.empty(s.shape, dtype=s.torch_dtype, device="meta") for s in sample.inputs]
    prog = _trace(mod, graph, args, optimize=False, attention=attention, ranges=ranges)
    _name_dims(prog, graph)

    inits = prog.model.graph.initializers
    for name, value in inits.items():
        key = name[len(WEIGHT_PREFIX):] if name.startswith(WEIGHT_PREFIX) else name
        if key in want:
            to = stored_dtype(key, sd[key].dtype, dtype)
            value.const_value = _lazy(source[key], key, to, want[key], str(ckpt_dir))
        elif key in tables:
            value.const_value = TorchTensor(tables[key], name)
    meta = [n for n, v in inits.items() if _is_empty(v)]
    if meta:
        raise ExportError(f"{graph.name}: initializers without real values after streaming: {meta[:5]}")
    _optimize_keeping_weights(prog.model)
    path = folder / f"{graph.name}.onnx"
    prog.save(path, external_data=True)
    return path


# ---- the entry point ------------------------------------------------------------------------------

def _network_options(graph: Graph, attention: str, quant: str) -> dict:
    """Plugin exports trace a DiT built to call the flf2v custom ops (plugins.translation_table); FP8 exports
    one whose blocks' linears are models.quant.FP8Linear (qdq.translation_table). The cached DiT step runs
    no block: it takes neither."""
    if graph.component != "dit" or graph.name.startswith("dit_cached"):
        return {}
    return {**({"attention": plugins.DIT_ATTENTION[attention]} if attention in plugins.DIT_ATTENTION else {}),
            **({"quant": quant} if quant != "none" else {})}


def _publish(tmp: Path, path: Path) -> None:
    """Move tmp/<name>.onnx (+ .data) to `path`: old graph removed first, data next, graph last."""
    data, new_data = path.with_name(path.name + ".data"), tmp / (path.name + ".data")
    path.unlink(missing_ok=True)
    if new_data.exists():
        os.replace(new_data, data)
    else:
        data.unlink(missing_ok=True)
    os.replace(tmp / path.name, path)


def export_graph(graph: Graph, module_or_ckpt, path: str | os.PathLike, *, preset: Preset | None = None,
                 stream: bool | None = None, source: dict | None = None, check: bool = True,
                 attention: str = "onnx", ranges: dict[str, tuple[int, int]] | None = None,
                 quant: str = "none") -> Path:
    """Export `graph` to `path` (a `.onnx` file, with `<path>.data` beside it when weights are external).

    `module_or_ckpt` is either an adapter module (`contracts.module`) with real weights, exported
    directly, or a checkpoint directory: its network is then streamed when `stream` is True, or when
    None and its weights exceed STREAM_BYTES, else loaded and exported directly. `source` replaces the
    checkpoint's tensors on the streamed route (key -> getter; used by the memory benchmark).
    The graph goes through `passes.clean` and, if `check`, `passes.check_graph` (ExportError on failure).
    `attention` (DiT graphs): "onnx", TensorRT's own Attention node, or "plugin", the fused Triton kernels
    as flf2v TensorRT plugin nodes (plugins.py; TensorRT only, ONNX Runtime cannot run them), or "sage", the
    8-bit self-attention plugin behind its quantization in standard ops (sage_graph.py).
    `ranges` (dynamic graphs, required there): root dim -> (min, max), e.g. `DynamicShape.envelope()`.
    `quant` (DiT graphs, "none" or "fp8"): the blocks' linears as FP8 Q/DQ (qdq.py).
    """
    if attention not in plugins.ATTENTION:
        raise ValueError(f"attention must be one of {plugins.ATTENTION}, got {attention!r}")
    if attention != "onnx" and graph.component != "dit":
        raise ValueError(f"attention={attention!r} applies to DiT graphs, not {graph.name!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}.partial-", dir=path.parent))
    try:
        if isinstance(module_or_ckpt, nn.Module):
            out = export_direct(graph, module_or_ckpt, tmp, attention, ranges)
        else:
            ckpt_dir = Path(module_or_ckpt)
            preset = preset or ck.preset_for(ckpt_dir)
            if stream is None:
                stream = weight_bytes(ck.build_meta(ckpt_dir, graph.component, preset), graph.compute_dtype) > STREAM_BYTES
            if stream or source is not None:
                out = export_streamed(graph, ckpt_dir, preset, tmp, source, attention, ranges, quant)
            else:
                net = ck.load(ckpt_dir, graph.component, graph.compute_dtype, preset,
                              **_network_options(graph, attention, quant))
                out = export_direct(graph, module(graph, {graph.component: net}), tmp, attention, ranges)
        passes.clean(out, keep_named=WEIGHT_PREFIX if graph.component == "dit" else None)
        if check:
            problems = passes.check_graph(out, graph, plugins.NODES[attention])
            if problems:
                raise ExportError(f"{graph.name}: " + "; ".join(problems))
        _publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
