"""TensorRT AOT plugins for the fused attention kernels (tensorrt.plugin, TensorRT >= 10.9).

Plugins in namespace "flf2v", each one Triton kernel compiled to PTX and baked into the engine:
  wan_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, rstd_q, rstd_k; num_heads) -> out
  wan_cross_attention(q, k_txt, v_txt, k_img, v_img; num_heads) -> out
  wan_sage_attention(q_codes, q_scales, k_codes, k_scales, v; num_heads) -> out   (8-bit, --attention sage)
Shapes and cast points are those of torch.ops.flf2v.* (attention.py, cross_attention.py). An AOT plugin
launches a single kernel, so the RMS statistics of the raw q and k, rstd = 1 / sqrt(mean(x.float()^2) + eps)
[B, L] fp32, are inputs here: the exporter computes them with standard ops (Cast, Mul, ReduceMean, Add,
Sqrt, Reciprocal), which TensorRT fuses into one reduction. The plugin normalises and rotates k as its
tiles load (NORM_K): with a k normed in the graph, TensorRT's own fused attention would do the job.

In ONNX a plugin node has op_type = the plugin name, domain "flf2v" and the attributes num_heads (int),
plugin_namespace = "flf2v" and aot = 1 (select the AOT implementation). I/O: contiguous tensors, one dtype
(fp16, bf16 or fp32) for q/k/v/weights/out, fp32 for cos/sin/rstd. The sage plugin is sage_attention.py's
attention kernel alone: its int8 codes and fp32 block scales (of the normed, rotated q and the smoothed k)
come from standard ops in the graph (export/sage_graph.py), where TensorRT fuses them; int8 codes [B, L, dim],
scales [B, H, cdiv(L, 128)] for q and [B, H, cdiv(L, 64)] for k, v and out in the activation dtype.
TensorRT times the tactics (= Triton configs) at build time.

Tactic t >= 1 is config t - 1 of the kernel's list (`tactic_configs`): the tuned configs for fp16/bf16, the one
FP32_CONFIG for fp32. A config that needs more shared memory per block than the build GPU has cannot launch, so
the autotune callback compiles every config and offers only those that fit (`tactics`); the kernels are cached,
and aot_impl takes the one TensorRT picked from the cache.

tensorrt is imported only by `register_plugins()`; `compile_*`, `tactics` and `aot_ptx` need triton only (they run
on a CPU machine for a given GPU target when `build_target` is replaced, e.g. to check every config for sm_90).
No `from __future__ import annotations` here: tensorrt.plugin reads the annotations as objects.
"""
import functools
import math
import os
from typing import List, Tuple, Union

import numpy as np
import numpy.typing as npt
import triton

from . import attention, common, cross_attention, sage_attention

_registered = False
# The num_heads attribute arrives as a one-element array: TensorRT 10.x turns an `int` attribute into a Python int
# with int(array), which numpy >= 2.4 refuses (TensorRT 11 takes array[0]); an array attribute works in both.
Heads = npt.NDArray[np.int32]


# ---- AOT compilation (triton only) ----------------------------------------------------------------

def build_target():
    """(Triton target, max opt-in shared memory per block in bytes) of the GPU TensorRT builds on: the current
    CUDA device, on which TensorRT times the tactics. Tests replace it to build for a GPU on a CPU machine."""
    driver = triton.runtime.driver.active
    props = driver.utils.get_device_properties(driver.get_current_device())
    return driver.get_current_target(), props["max_shared_mem"]


# TensorRT keeps the PTX in the engine and the driver JIT-compiles it when the engine loads; a driver refuses a
# PTX ISA newer than it knows, and Triton writes the newest its ptxas knows (9.4 with Triton 3.9: CUDA 13.4 drivers).
# So each target gets the oldest ISA that has it; these kernels need nothing newer (Triton 3.9's PTX for them
# assembles at these ISAs, checked with ptxas for every target below). Arch -> ISA, and the oldest driver for it:
_PTX_ISA = {80: 70, 86: 71, 89: 78,  # Ampere, Ada (sm_80/86/89): CUDA 11.0 / 11.1 / 11.8 drivers, R450 / R455 / R520
            90: 80,  # Hopper (sm_90a, wgmma): CUDA 12.0, R525
            100: 86, 120: 87,  # Blackwell (sm_100a, sm_120a): CUDA 12.8, R570
            103: 88, 121: 88}  # Blackwell Ultra, GB10 (sm_103a, sm_121a): CUDA 12.9, R575


def ptx_isa(arch: int):
    """PTX ISA version (84 = 8.4) for a target, or None (Triton's newest) for a GPU newer than the table."""
    return _PTX_ISA.get(arch)


def _compile(fn, pointers: dict, constexprs: dict, config: triton.Config, target, aligned_ints=()):
    """triton.compile `fn` for `target`: pointer args typed by `pointers`, other non-constexpr args i32."""
    if common.INTERPRET:
        raise RuntimeError("AOT compilation needs the kernels built without TRITON_INTERPRET=1")
    from triton.compiler import ASTSource

    constexprs = {**constexprs, **config.kwargs}
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    # 16-byte aligned pointers (TensorRT allocates 256-byte aligned) and 16-divisible strides let loads vectorise.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in list(pointers) + list(aligned_ints)}
    if target is None:
        target = build_target()[0]
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if ptx_isa(target.arch):
        options["ptx_version"] = ptx_isa(target.arch)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)


def compile_self_attention(dtype: str, dim: int, num_heads: int, config: triton.Config, target=None):
    """The fused self-attention kernel (NORM_K) for q/k/v of `dtype` ("fp16", "bf16", "fp32")."""
    d = common.head_dim_of(dim, num_heads)
    p = f"*{dtype}"
    pointers = dict(Q=p, K=p, V=p, WQ=p, WK=p, COS="*fp32", SIN="*fp32", RQ="*fp32", RK="*fp32", Out=p)
    strides = [f"stride_{t}{a}" for t in "qkv" for a in "bl"] if dim % 16 == 0 else []
    return _compile(attention.self_attn_fwd_kernel, pointers,
                    dict(QK_SCALE=common.LOG2E / math.sqrt(d), HEAD_DIM=d, NORM_K=True), config, target, strides)


def compile_cross_attention(dtype: str, dim: int, num_heads: int, config: triton.Config, target=None):
    """The fused text + image cross-attention kernel for tensors of `dtype`."""
    d = common.head_dim_of(dim, num_heads)
    p = f"*{dtype}"
    pointers = dict(Q=p, KT=p, VT=p, KI=p, VI=p, Out=p)
    strides = [f"stride_{t}{a}" for t in ("q", "kt", "vt", "ki", "vi") for a in "bl"] if dim % 16 == 0 else []
    return _compile(cross_attention.cross_attn_fwd_kernel, pointers,
                    dict(QK_SCALE=common.LOG2E / math.sqrt(d), HEAD_DIM=d), config, target, strides)


def compile_sage_attention(dtype: str, dim: int, num_heads: int, config: triton.Config, target=None):
    """The 8-bit attention kernel on int8 q/k codes with fp32 block scales, v and out of `dtype`."""
    p = f"*{dtype}"
    pointers = dict(QI="*i8", QS="*fp32", KI="*i8", KS="*fp32", V=p, Out=p)
    strides = ["stride_vb", "stride_vl"] if dim % 16 == 0 else []
    return _compile(sage_attention.sage_fwd_kernel, pointers, dict(HEAD_DIM=common.head_dim_of(dim, num_heads)),
                    config, target, strides)


COMPILE = {"self": compile_self_attention, "cross": compile_cross_attention, "sage": compile_sage_attention}
# The sage blocks are the quantization's granularity (fixed): its tactics differ in warps and stages only.
SAGE_CONFIGS = [triton.Config({"BLOCK_M": sage_attention.BLOCK_M, "BLOCK_N": sage_attention.BLOCK_N},
                              num_warps=c.num_warps, num_stages=c.num_stages) for c in sage_attention.SAGE_CONFIGS]


def aot_ptx(kernel) -> Tuple[bytes, bytes]:
    """(name, PTX) for TensorRT's AOT launcher, which passes exactly inputs, extra int32 args, outputs.

    Triton >= 3.3 appends hidden pointer parameters (global and profile scratch) to every kernel; these
    kernels use no scratch, so the parameters are never read and are dropped from the entry signature.
    """
    md = kernel.metadata
    if md.global_scratch_size or getattr(md, "profile_scratch_size", 0):
        raise RuntimeError(f"{md.name} needs Triton scratch memory ({md.global_scratch_size} B), which "
                           f"TensorRT AOT plugins cannot provide")
    n_args = sum(1 for p in kernel.src.fn.params if not p.is_constexpr)
    head, entry, rest = kernel.asm["ptx"].partition(f".entry {md.name}(")
    params, close, body = rest.partition(")")
    params = params.split(",")
    for p in params[n_args:]:
        if f"[{p.split()[-1]}]" in body:
            raise RuntimeError(f"{md.name}: hidden parameter {p.split()[-1]} is used by the kernel")
    ptx = head + entry + ",".join(params[:n_args]) + "\n" + close + body
    return md.name.encode(), ptx.encode()


def tactic_configs(kind: str, dtype: str) -> List[triton.Config]:
    """The configs of the "self", "cross" or "sage" kernel for `dtype`: tactic t >= 1 is configs[t - 1]."""
    if kind == "sage":
        return SAGE_CONFIGS
    if dtype == "fp32":
        return [common.FP32_CONFIG]
    return attention.SELF_ATTN_CONFIGS if kind == "self" else cross_attention.CROSS_ATTN_CONFIGS


@functools.lru_cache(maxsize=None)
def _kernel(kind: str, dtype: str, dim: int, num_heads: int, tactic: int, target):
    return COMPILE[kind](dtype, dim, num_heads, tactic_configs(kind, dtype)[tactic - 1], target)


def tactics(kind: str, dtype: str, dim: int, num_heads: int) -> List[int]:
    """The tactics whose kernel fits in the build GPU's shared memory per block (the others cannot launch)."""
    target, max_shared = build_target()
    fit = [t for t in range(1, len(tactic_configs(kind, dtype)) + 1)
           if _kernel(kind, dtype, dim, num_heads, t, target).metadata.shared <= max_shared]
    if not fit:
        raise ValueError(f"no flf2v {kind}-attention kernel ({dtype}, head dim {dim // num_heads}) fits in the "
                         f"{max_shared} B of shared memory per block of sm_{target.arch}: use --attention onnx")
    if os.environ.get("FLF2V_PLUGIN_TACTICS") == "largest":
        # gpu-check: only the tactic with the most dynamic shared memory, so the engine must launch it (over
        # 48 KB needs the function attribute raised, which TensorRT's AOT launcher may or may not do)
        fit = [max(fit, key=lambda t: _kernel(kind, dtype, dim, num_heads, t, target).metadata.shared)]
    return fit


def _kernel_for(kind: str, dtype: str, dim: int, num_heads: int, tactic: int):
    """(kernel, config) for the tactic TensorRT picked; 0 (TensorRT's default, if it timed none) is the first."""
    tactic = tactic or tactics(kind, dtype, dim, num_heads)[0]
    return _kernel(kind, dtype, dim, num_heads, tactic, build_target()[0]), tactic_configs(kind, dtype)[tactic - 1]


# ---- TensorRT registration ------------------------------------------------------------------------

def register_plugins() -> None:
    """Register flf2v::wan_self_attention, wan_cross_attention and wan_sage_attention with TensorRT (idempotent).

    Call before building or deserialising an engine that holds these plugin nodes.
    """
    global _registered
    if _registered:
        return
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as err:
        raise RuntimeError(f"the flf2v TensorRT plugins need TensorRT >= 10.9 with its Python plugin API "
                           f"(pip install 'tensorrt>=10.14'): {err}") from err
    if not hasattr(trtp, "aot_impl"):
        raise RuntimeError(f"tensorrt {trt.__version__} has no tensorrt.plugin.aot_impl: need TensorRT >= 10.9")
    _register_self_attention(trt, trtp)
    _register_cross_attention(trt, trtp)
    _register_sage_attention(trt, trtp)
    _registered = True


def _triton_type(trt, dtype) -> str:
    types = {trt.float16: "fp16", trt.bfloat16: "bf16", trt.float32: "fp32"}
    if dtype not in types:
        raise ValueError(f"flf2v attention plugins take fp16, bf16 or fp32 tensors, got {dtype}")
    return types[dtype]


def _static_dim(desc, name: str) -> int:
    e = desc.shape_expr[2]
    if not e.is_constant:
        raise ValueError(f"{name}: the model dim (last axis) must be static for the AOT kernel")
    return e.constant_value()  # a method in tensorrt.plugin 10.9-11.4, though is_constant is a property


def _launch(trtp, kernel, grid_x, grid_y):
    params = trtp.KernelLaunchParams()
    params.grid_x = grid_x
    params.grid_y = grid_y
    params.block_x = kernel.metadata.num_warps * 32
    params.shared_mem = kernel.metadata.shared
    return params


def _aot_launch(trt, trtp, kind: str, like, name: str, num_heads, tactic: int, extra_of):
    """What aot_impl returns: the kernel's name and PTX, its launch (grid cdiv(L, BLOCK_M) x B * H, L and B from
    `like`, the tensor called `name` whose model dim and dtype pick the kernel) and its int32 arguments
    `extra_of(dim, num_heads)`, in the kernel's order between inputs and outputs."""
    num_heads = int(num_heads[0])
    dim = _static_dim(like, name)
    kernel, config = _kernel_for(kind, _triton_type(trt, like.dtype), dim, num_heads, tactic)
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in extra_of(dim, num_heads)])
    kname, ptx = aot_ptx(kernel)
    grid_x = trtp.cdiv(like.shape_expr[1], config.kwargs["BLOCK_M"])
    return kname, ptx, _launch(trtp, kernel, grid_x, like.shape_expr[0] * num_heads), extra


def _register_self_attention(trt, trtp):
    TD = trtp.TensorDesc

    @trtp.register("flf2v::wan_self_attention")
    def _desc(q: TD, k: TD, v: TD, norm_q_weight: TD, norm_k_weight: TD, cos: TD, sin: TD,
              rstd_q: TD, rstd_k: TD, num_heads: Heads) -> TD:
        return q.like()

    @trtp.autotune("flf2v::wan_self_attention")
    def _tune(q: TD, k: TD, v: TD, norm_q_weight: TD, norm_k_weight: TD, cos: TD, sin: TD,
              rstd_q: TD, rstd_k: TD, num_heads: Heads, outputs: Tuple[TD]) -> List[trtp.AutoTuneCombination]:
        # The descriptors carry the network's types, which a strongly typed network fixes: offer q's only.
        dtype = _triton_type(trt, q.dtype)
        types = ",".join([dtype.upper()] * 5 + ["FP32"] * 4 + [dtype.upper()])
        fit = tactics("self", dtype, _static_dim(q, "q"), int(num_heads[0]))
        return [trtp.AutoTuneCombination(types, "LINEAR", fit)]

    @trtp.aot_impl("flf2v::wan_self_attention")
    def _aot(q: TD, k: TD, v: TD, norm_q_weight: TD, norm_k_weight: TD, cos: TD, sin: TD,
             rstd_q: TD, rstd_k: TD, num_heads: Heads, outputs: Tuple[TD], tactic: int
             ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        s = q.shape_expr[1]  # contiguous [B, L, dim]: batch stride L * dim, row stride dim
        return _aot_launch(trt, trtp, "self", q, "q", num_heads, tactic,
                           lambda dim, h: (s, h, s * dim, dim, s * dim, dim, s * dim, dim))


def _register_cross_attention(trt, trtp):
    TD = trtp.TensorDesc

    @trtp.register("flf2v::wan_cross_attention")
    def _desc(q: TD, k_txt: TD, v_txt: TD, k_img: TD, v_img: TD, num_heads: Heads) -> TD:
        return q.like()

    @trtp.autotune("flf2v::wan_cross_attention")
    def _tune(q: TD, k_txt: TD, v_txt: TD, k_img: TD, v_img: TD, num_heads: Heads, outputs: Tuple[TD]
              ) -> List[trtp.AutoTuneCombination]:
        dtype = _triton_type(trt, q.dtype)
        fit = tactics("cross", dtype, _static_dim(q, "q"), int(num_heads[0]))
        return [trtp.AutoTuneCombination(",".join([dtype.upper()] * 6), "LINEAR", fit)]

    @trtp.aot_impl("flf2v::wan_cross_attention")
    def _aot(q: TD, k_txt: TD, v_txt: TD, k_img: TD, v_img: TD, num_heads: Heads, outputs: Tuple[TD],
             tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        lq, lt, li = q.shape_expr[1], k_txt.shape_expr[1], k_img.shape_expr[1]
        return _aot_launch(trt, trtp, "cross", q, "q", num_heads, tactic, lambda dim, h: (
            lq, lt, li, h, lq * dim, dim, lt * dim, dim, lt * dim, dim, li * dim, dim, li * dim, dim))


def _register_sage_attention(trt, trtp):
    TD = trtp.TensorDesc

    @trtp.register("flf2v::wan_sage_attention")
    def _desc(q_codes: TD, q_scales: TD, k_codes: TD, k_scales: TD, v: TD, num_heads: Heads) -> TD:
        return v.like()

    @trtp.autotune("flf2v::wan_sage_attention")
    def _tune(q_codes: TD, q_scales: TD, k_codes: TD, k_scales: TD, v: TD, num_heads: Heads, outputs: Tuple[TD]
              ) -> List[trtp.AutoTuneCombination]:
        dtype = _triton_type(trt, v.dtype)
        fit = tactics("sage", dtype, _static_dim(v, "v"), int(num_heads[0]))
        return [trtp.AutoTuneCombination(f"INT8,FP32,INT8,FP32,{dtype.upper()},{dtype.upper()}", "LINEAR", fit)]

    @trtp.aot_impl("flf2v::wan_sage_attention")
    def _aot(q_codes: TD, q_scales: TD, k_codes: TD, k_scales: TD, v: TD, num_heads: Heads, outputs: Tuple[TD],
             tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        s = v.shape_expr[1]
        return _aot_launch(trt, trtp, "sage", v, "v", num_heads, tactic, lambda dim, h: (s, h, s * dim, dim))
