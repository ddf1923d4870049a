"""What both fused attention kernels share, in the tutorial's order: the Triton building blocks (row loads,
one online-softmax step), the launch configs that are not tuned, and the host-side checks.
"""
import contextlib

import torch
import triton
import triton.language as tl

# triton.jit reads TRITON_INTERPRET when a kernel is defined, i.e. when this module is imported.
INTERPRET = triton.knobs.runtime.interpret
LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- kernel building blocks -------------------------------------------------------------------------

@triton.jit
def load_rows(P, stride_l, offs_l, L, offs_c, MASK: tl.constexpr):
    """Rows offs_l (masked against L when MASK) and columns offs_c of a row-major tile."""
    ptrs = P + offs_l[:, None] * stride_l + offs_c[None, :]
    if MASK:
        x = tl.load(ptrs, mask=offs_l[:, None] < L, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def online_softmax_step(acc, m_i, l_i, q, k, v, offs_n, L, QK_SCALE: tl.constexpr, MASK: tl.constexpr):
    """Fold one key block into the running (acc, row max m_i, row sum l_i); scores in log2 units."""
    s = tl.dot(q, tl.trans(k), input_precision="tf32x3")
    if MASK:
        s = tl.where(offs_n[None, :] < L, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * QK_SCALE)
    p = tl.math.exp2(s * QK_SCALE - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="tf32x3")
    return acc, m_new, l_i


# ---- configs -------------------------------------------------------------------------------------

def configs(*mnws):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in mnws]


# fp32 is the check path: tf32x3 dots (about fp32 accuracy on tensor cores) in small tiles, untuned.
FP32_CONFIG = configs((64, 32, 4, 1))[0]
# The interpreter runs one program at a time in numpy: small blocks, no tuning.
INTERPRET_CONFIG = configs((16, 16, 4, 1))[0]

def fixed_config(dtype: torch.dtype) -> triton.Config | None:
    """The config to launch with when not autotuning (interpreter, fp32), else None."""
    return INTERPRET_CONFIG if INTERPRET else FP32_CONFIG if dtype == torch.float32 else None


def config_kwargs(config: triton.Config | None) -> dict:
    """A fixed config as launch kwargs. Not `Config.all_kwargs()`: it adds num_ctas, which torch's traced
    launches (wrap_triton, what AOTInductor compiles) refuse."""
    if config is None:
        return {}
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


# ---- launching ------------------------------------------------------------------------------------

def launch(kernel):
    """`kernel` as torch's tracers see it (`torch.library.wrap_triton`): inside the flf2v triton_ops
    (kernels/ops.py) torch.export and AOTInductor record the launch and compile the kernel into the package;
    in eager the op turns wrapping off and this is the kernel itself. The interpreter's kernels cannot be
    traced: wrap_triton hands them back as they are."""
    return torch.library.wrap_triton(kernel)


@contextlib.contextmanager
def eager_launches():
    """Direct calls of the kernel wrappers outside the ops (the kernel bench) without torch's
    higher-order-op dispatch per launch (~1 ms, torch/_library/triton.py): what the ops do in eager."""
    from torch._library.triton import set_wrap_triton_enabled
    with set_wrap_triton_enabled(False):
        yield



# ---- host-side checks ------------------------------------------------------------------------------

def check_device(*tensors: torch.Tensor) -> None:
    """Same device for all; CUDA, or CPU when the kernels were built by the Triton interpreter."""
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")
    if dev.type == "cuda" or (dev.type == "cpu" and INTERPRET):
        return
    raise RuntimeError(f"flf2v Triton kernels need CUDA tensors, got device {dev}; on CPU they run only "
                       f"through the Triton interpreter: set TRITON_INTERPRET=1 before importing "
                       f"flf2v.kernels (slow, for tests)")


def check_heads(name: str, x: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None) -> None:
    """x must be [B, L, dim] of `shape` (None entries free), unit stride along dim, in `dtype`."""
    if x.dim() != len(shape) or any(s is not None and s != xs for s, xs in zip(shape, x.shape)):
        raise ValueError(f"{name} must have shape {tuple('*' if s is None else s for s in shape)}, "
                         f"got {tuple(x.shape)}")
    if x.dtype not in DTYPES or (dtype is not None and x.dtype != dtype):
        raise ValueError(f"{name} must be {dtype or 'float16, bfloat16 or float32'}, got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along its last dim, got strides {x.stride()}")


def head_dim_of(dim: int, num_heads: int) -> int:
    if num_heads <= 0 or dim % num_heads:
        raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    d = dim // num_heads
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 (tl.arange, tl.dot), got {d}")
    return d


def new_output(out: torch.Tensor | None, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fresh output, or `out` checked to be a contiguous buffer of that shape, dtype and device."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if out.shape != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(shape)} {dtype} tensor on {device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device} strides {out.stride()}")
    return out
