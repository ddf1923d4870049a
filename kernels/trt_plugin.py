"""TensorRT AOT plugins for the fused attention kernels (tensorrt.plugin, TensorRT >= 10.9).

Plugins in namespace "flf2v", each one Triton kernel compiled to PTX and baked into the engine:
  wan_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, rstd_q, rstd_k; num_heads) -> out
  wan_cross_attention(q, k_txt, v_txt, k_img, v_img; num_heads) -> out
Shapes and cast points are those of torch.ops.flf2v.* (attention.py, cross_attention.py). An AOT plugin
launches a single kernel, so the RMS statistics of the raw q and k, rstd = 1 / sqrt(mean(x.float()^2) + eps)
[B, L] fp32, are inputs here: the exporter computes them with standard ops (Cast, Mul, ReduceMean, Add,
Sqrt, Reciprocal), which TensorRT fuses into one reduction. The plugin normalises and rotates k as its
tiles load (NORM_K): with a k normed in the graph, TensorRT's own fused attention would do the job.

In ONNX a plugin node has op_type = the plugin name, domain "flf2v" and the attributes num_heads (int),
plugin_namespace = "flf2v" and aot = 1 (select the AOT implementation). I/O: contiguous tensors, one dtype
(fp16, bf16 or fp32) for q/k/v/weights/out, fp32 for cos/sin/rstd. TensorRT times the tactics (= Triton
configs) at build time.

tensorrt is imported only by `register_plugins()`; `compile_*` and `aot_ptx` need triton only (they run on a
CPU machine for a given GPU target, e.g. to check that every config compiles for sm_90).
No `from __future__ import annotations` here: tensorrt.plugin reads the annotations as objects.
"""
import math
from typing import List, Tuple, Union

import triton

from . import attention, cross_attention

_IO_TYPES = "FP16|BF16|FP32"
_registered = False


# ---- AOT compilation (triton only) ----------------------------------------------------------------

def _compile(fn, pointers: dict, constexprs: dict, config: triton.Config, target, aligned_ints=()):
    """triton.compile `fn` for `target`: pointer args typed by `pointers`, other non-constexpr args i32."""
    if attention.INTERPRET:
        raise RuntimeError("AOT compilation needs the kernels built without TRITON_INTERPRET=1")
    from triton.compiler import ASTSource

    constexprs = {**constexprs, **config.kwargs}
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    # 16-byte aligned pointers (TensorRT allocates 256-byte aligned) and 16-divisible strides let loads vectorise.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in list(pointers) + list(aligned_ints)}
    if target is None:
        target = triton.runtime.driver.active.get_current_target()
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if target.arch == 90:
        # TensorRT hands the PTX to the driver's JIT: Triton would target the newest PTX ISA its ptxas
        # knows (9.4 with Triton 3.9, CUDA 13.4 drivers); 8.4 has everything sm_90a needs (R550+ drivers).
        options["ptx_version"] = 84
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)


def compile_self_attention(dtype: str, dim: int, num_heads: int, config: triton.Config, target=None):
    """The fused self-attention kernel (NORM_K) for q/k/v of `dtype` ("fp16", "bf16", "fp32")."""
    d = attention.head_dim_of(dim, num_heads)
    p = f"*{dtype}"
    pointers = dict(Q=p, K=p, V=p, WQ=p, WK=p, COS="*fp32", SIN="*fp32", RQ="*fp32", RK="*fp32", Out=p)
    strides = [f"stride_{t}{a}" for t in "qkv" for a in "bl"] if dim % 16 == 0 else []
    return _compile(attention._self_attn_fwd_kernel, pointers,
                    dict(QK_SCALE=attention.LOG2E / math.sqrt(d), HEAD_DIM=d, NORM_K=True), config, target, strides)


def compile_cross_attention(dtype: str, dim: int, num_heads: int, config: triton.Config, target=None):
    """The fused text + image cross-attention kernel for tensors of `dtype`."""
    d = attention.head_dim_of(dim, num_heads)
    p = f"*{dtype}"
    pointers = dict(Q=p, KT=p, VT=p, KI=p, VI=p, Out=p)
    strides = [f"stride_{t}{a}" for t in ("q", "kt", "vt", "ki", "vi") for a in "bl"] if dim % 16 == 0 else []
    return _compile(cross_attention._cross_attn_fwd_kernel, pointers,
                    dict(QK_SCALE=attention.LOG2E / math.sqrt(d), HEAD_DIM=d), config, target, strides)


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


def _tactic_config(configs, tactic: int, dtype: str) -> triton.Config:
    """TensorRT tactic t >= 1 is configs[t - 1], the default tactic 0 the first; fp32 has one config."""
    return attention.FP32_CONFIG if dtype == "fp32" else configs[max(tactic, 1) - 1]


# ---- TensorRT registration ------------------------------------------------------------------------

def register_plugins() -> None:
    """Register flf2v::wan_self_attention and flf2v::wan_cross_attention with TensorRT (idempotent).

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
    return e.constant_value


def _launch(trtp, kernel, grid_x, grid_y):
    params = trtp.KernelLaunchParams()
    params.grid_x = grid_x
    params.grid_y = grid_y
    params.block_x = kernel.metadata.num_warps * 32
    params.shared_mem = kernel.metadata.shared
    return params


def _register_self_attention(trt, trtp):
    TD = trtp.TensorDesc
    configs = attention.SELF_ATTN_CONFIGS

    @trtp.register("flf2v::wan_self_attention")
    def _desc(q: TD, k: TD, v: TD, norm_q_weight: TD, norm_k_weight: TD, cos: TD, sin: TD,
              rstd_q: TD, rstd_k: TD, num_heads: int) -> TD:
        return q.like()

    @trtp.autotune("flf2v::wan_self_attention")
    def _tune(q: TD, k: TD, v: TD, norm_q_weight: TD, norm_k_weight: TD, cos: TD, sin: TD,
              rstd_q: TD, rstd_k: TD, outputs: Tuple[TD]) -> List[trtp.AutoTuneCombination]:
        types = ",".join([_IO_TYPES] * 5 + ["FP32"] * 4 + [_IO_TYPES])
        return [trtp.AutoTuneCombination(types, "LINEAR", list(range(1, len(configs) + 1)))]

    @trtp.aot_impl("flf2v::wan_self_attention")
    def _aot(q: TD, k: TD, v: TD, norm_q_weight: TD, norm_k_weight: TD, cos: TD, sin: TD,
             rstd_q: TD, rstd_k: TD, num_heads: int, outputs: Tuple[TD], tactic: int
             ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        dtype = _triton_type(trt, q.dtype)
        dim = _static_dim(q, "q")
        config = _tactic_config(configs, tactic, dtype)
        kernel = compile_self_attention(dtype, dim, num_heads, config)
        b, s = q.shape_expr[0], q.shape_expr[1]
        row, batch = dim, s * dim  # contiguous [B, L, dim]
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in
                                             (s, num_heads, batch, row, batch, row, batch, row)])
        name, ptx = aot_ptx(kernel)
        return name, ptx, _launch(trtp, kernel, trtp.cdiv(s, config.kwargs["BLOCK_M"]), b * num_heads), extra


def _register_cross_attention(trt, trtp):
    TD = trtp.TensorDesc
    configs = cross_attention.CROSS_ATTN_CONFIGS

    @trtp.register("flf2v::wan_cross_attention")
    def _desc(q: TD, k_txt: TD, v_txt: TD, k_img: TD, v_img: TD, num_heads: int) -> TD:
        return q.like()

    @trtp.autotune("flf2v::wan_cross_attention")
    def _tune(q: TD, k_txt: TD, v_txt: TD, k_img: TD, v_img: TD, outputs: Tuple[TD]
              ) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(",".join([_IO_TYPES] * 6), "LINEAR", list(range(1, len(configs) + 1)))]

    @trtp.aot_impl("flf2v::wan_cross_attention")
    def _aot(q: TD, k_txt: TD, v_txt: TD, k_img: TD, v_img: TD, num_heads: int, outputs: Tuple[TD],
             tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        dtype = _triton_type(trt, q.dtype)
        dim = _static_dim(q, "q")
        config = _tactic_config(configs, tactic, dtype)
        kernel = compile_cross_attention(dtype, dim, num_heads, config)
        b, lq, lt, li = q.shape_expr[0], q.shape_expr[1], k_txt.shape_expr[1], k_img.shape_expr[1]
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (
            lq, lt, li, num_heads, lq * dim, dim, lt * dim, dim, lt * dim, dim, li * dim, dim, li * dim, dim)])
        name, ptx = aot_ptx(kernel)
        return name, ptx, _launch(trtp, kernel, trtp.cdiv(lq, config.kwargs["BLOCK_M"]), b * num_heads), extra
