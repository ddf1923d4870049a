"""Triton attention kernels vs their PyTorch references and an independent fp64 computation.

Without CUDA the kernels run in the Triton interpreter: TRITON_INTERPRET=1 must be set before
flf2v.kernels is imported (triton.jit reads it when a kernel is defined; importing torch or triton
earlier is fine), which tests/conftest.py and the line below do. bf16 numerics run on a GPU only: the
interpreter's tl.dot multiplies bf16 tiles as raw integer bits (numpy has no bf16; errors ~1e10) and
rounds bf16 stores differently from torch.

The fp64 oracle is written from the definition (complex RoPE as in the official rope_apply, explicit
softmax) and rounds q', k' to the input dtype where the spec does, so it is the exact value of the
specified computation; errors are max|a - b| and max|a - b| / max|b| against it.
"""
import math
import os
import subprocess
import sys
import textwrap

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton", reason="the flf2v attention kernels are Triton kernels")
from conftest import rel_err
from flf2v.kernels import attention, cross_attention, ops, trt_plugin  # noqa: E402,F401  (ops: torch.ops.flf2v.*)

GPU = torch.cuda.is_available() and not attention.INTERPRET
DEVICE = "cuda" if GPU else "cpu"
if not GPU and not attention.INTERPRET:
    pytest.fail("flf2v.kernels was imported without TRITON_INTERPRET=1 and there is no GPU: set "
                "TRITON_INTERPRET=1 in the environment (tests/conftest.py does)", pytrace=False)

# Max |a - b| / max |b| against the fp64 oracle. fp32 runs tf32x3 dots on a GPU (about fp32).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# bf16 on a GPU only (gpu mark), and with compiled kernels (a GPU machine may still set TRITON_INTERPRET=1)
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, pytest.mark.skipif(
              not GPU, reason="bf16 tl.dot is wrong in the Triton interpreter: compiled kernels only")])]
EPS = 1e-6


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def self_inputs(b, s, h, d, dtype, weight_dtype=None, seed=0):
    """Raw q, k, v with an offset and spread (so the RMS matters), random norm weights, random angles."""
    g = torch.Generator().manual_seed(seed)
    dim = h * d

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(DEVICE)

    q, k, v = rnd(b, s, dim, scale=3.0, shift=0.5), rnd(b, s, dim, scale=0.5), rnd(b, s, dim)
    wq, wk = rnd(dim, scale=0.7, shift=1.0), rnd(dim, scale=0.7, shift=1.0)
    angle = (torch.rand(s, d // 2, generator=g, dtype=torch.float64) * 40).to(DEVICE)
    cos, sin = angle.cos().float(), angle.sin().float()
    wdt = weight_dtype or dtype
    return q.to(dtype), k.to(dtype), v.to(dtype), wq.to(wdt), wk.to(wdt), cos, sin


def oracle_norm_rope(x, w, cos, sin, h):
    """fp64 RMSNorm over the full dim + complex RoPE per head, rounded where the spec rounds."""
    b, s, dim = x.shape
    x64 = x.double()
    n = (x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    n = (n.double() * w.double()).to(torch.promote_types(x.dtype, w.dtype))
    z = torch.view_as_complex(n.double().reshape(b, s, h, -1, 2).contiguous())
    z = z * torch.complex(cos.double(), sin.double())[None, :, None, :]
    return torch.view_as_real(z).reshape(b, s, dim).to(x.dtype)


def oracle_attention(q, k, v, h):
    """softmax(q k^T / sqrt(D)) v per head in fp64; q, k, v [B, L, dim] already prepared."""
    b, lq, dim = q.shape
    d = dim // h
    qh, kh, vh = (x.double().reshape(b, -1, h, d) for x in (q, k, v))
    p = torch.softmax(torch.einsum("blhd,bmhd->bhlm", qh, kh) / math.sqrt(d), dim=-1)
    return torch.einsum("bhlm,bmhd->blhd", p, vh).reshape(b, lq, dim)


def check(name, got, want, tol):
    assert not got.isnan().any(), f"{name}: NaNs left in the output (poisoned buffer not fully written)"
    abs_err, rel = rel_err(got, want)
    assert rel < tol, f"{name}: max abs {abs_err:.3g}, max rel {rel:.3g} (tol {tol:g})"
    return rel


# Interpreter shapes stay small; the GPU adds long ragged sequences.
SELF_SHAPES = [(1, 37, 2, 32),  # tiny preset (dim 64, 2 heads), odd length
               (2, 19, 1, 128),  # the 14B head_dim, batch 2
               (1, 16, 2, 32),  # exact multiple of the interpreter's 16-row blocks
               (1, 5, 2, 32)]  # shorter than one block
SELF_SHAPES += [(1, int(torch.randint(1, 70, (1,), generator=torch.Generator().manual_seed(7))), 2, 32)]
if GPU:
    SELF_SHAPES += [(1, 1001, 4, 128), (2, 4097, 2, 128), (1, 777, 2, 32)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_stats(dtype):
    x = self_inputs(2, 23, 2, 32, dtype)[0]
    got = attention.rms_stats(x, EPS, out=poisoned((2, 23), torch.float32))
    x64 = x.double()
    check("rms_stats", got, 1 / torch.sqrt((x64 * x64).mean(-1) + EPS), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_fp32", [False, True])
def test_norm_rope(dtype, weight_fp32):
    """The materialised k' (fuse_k=False pre-pass) equals the oracle to within one rounding."""
    b, s, h, d = 2, 21, 2, 32
    x, _, _, w, _, cos, sin = self_inputs(b, s, h, d, dtype, torch.float32 if weight_fp32 else None)
    rstd = attention.rms_stats(x, EPS)
    got = attention.norm_rope(x, rstd, w, cos, sin, h, out=poisoned(x.shape, dtype))
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    check("norm_rope", got, oracle_norm_rope(x, w, cos, sin, h), tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fuse_k", [False, True])
@pytest.mark.parametrize("shape", SELF_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_self_attention(shape, fuse_k, dtype):
    b, s, h, d = shape
    args = self_inputs(b, s, h, d, dtype, seed=s)
    got = attention.wan_self_attention(*args, EPS, h, fuse_k=fuse_k, out=poisoned((b, s, h * d), dtype))
    ref = attention.wan_self_attention_ref(*args, EPS, h)
    q, k, v, wq, wk, cos, sin = args
    want = oracle_attention(oracle_norm_rope(q, wq, cos, sin, h), oracle_norm_rope(k, wk, cos, sin, h), v, h)
    assert got.dtype == dtype and got.shape == (b, s, h * d)
    ref_err = check("reference vs fp64", ref, want, TOL[dtype])
    got_err = check("kernel vs fp64", got, want, TOL[dtype])
    check("kernel vs reference", got, ref, 2 * TOL[dtype])
    print(f"self {shape} {dtype} fuse_k={fuse_k}: rel err vs fp64 kernel {got_err:.2e}, reference {ref_err:.2e}")


def test_self_attention_fp32_weights():
    """bf16/fp16 activations with fp32 norm weights (the official run): the product stays fp32."""
    args = self_inputs(1, 29, 2, 32, torch.float16, torch.float32)
    got = attention.wan_self_attention(*args, EPS, out=poisoned((1, 29, 64), torch.float16))  # heads from cos
    q, k, v, wq, wk, cos, sin = args
    want = oracle_attention(oracle_norm_rope(q, wq, cos, sin, 2), oracle_norm_rope(k, wk, cos, sin, 2), v, 2)
    check("kernel vs fp64", got, want, TOL[torch.float16])


CROSS_SHAPES = [(1, 20, 512, 514, 2, 32),  # tiny preset, flf2v: 512 text + 514 image keys
                (1, 9, 512, 257, 2, 32),  # i2v: 257 image keys
                (2, 19, 24, 17, 1, 128),  # head_dim 128, batch 2, odd lengths
                (1, 7, 5, 3, 2, 32)]  # fewer keys than one block
if GPU:
    CROSS_SHAPES += [(1, 3001, 512, 514, 4, 128), (2, 1000, 512, 257, 2, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CROSS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cross_attention(shape, dtype):
    b, lq, lt, li, h, d = shape
    g = torch.Generator().manual_seed(lq)
    dim = h * d
    q, kt, vt, ki, vi = ((torch.randn(b, n, dim, generator=g) * sc).to(DEVICE, dtype)
                         for n, sc in ((lq, 2.0), (lt, 1.0), (lt, 1.0), (li, 1.5), (li, 1.0)))
    got = cross_attention.wan_cross_attention(q, kt, vt, ki, vi, h, out=poisoned((b, lq, dim), dtype))
    ref = cross_attention.wan_cross_attention_ref(q, kt, vt, ki, vi, h)
    want = oracle_attention(q, kt, vt, h) + oracle_attention(q, ki, vi, h)
    ref_err = check("reference vs fp64", ref, want, TOL[dtype])
    got_err = check("kernel vs fp64", got, want, TOL[dtype])
    check("kernel vs reference", got, ref, 2 * TOL[dtype])
    print(f"cross {shape} {dtype}: rel err vs fp64 kernel {got_err:.2e}, reference {ref_err:.2e}")


# ---- custom ops -----------------------------------------------------------------------------------

def test_ops_match_wrappers_and_trace():
    args = self_inputs(1, 13, 2, 32, torch.float32)
    got = torch.ops.flf2v.wan_self_attention(*args, EPS)
    assert torch.equal(got, attention.wan_self_attention(*args, EPS, 2))
    q = args[0]
    kv = [torch.randn(1, n, 64, device=DEVICE) for n in (11, 11, 6, 6)]
    assert torch.equal(torch.ops.flf2v.wan_cross_attention(q, *kv, 2),
                       cross_attention.wan_cross_attention(q, *kv, 2))
    # AOT dispatch (what AOTInductor does) traces the triton_ops' bodies into the kernels' launches, which
    # the interpreter's kernels cannot take (kernels/ops.py): on a CPU the schema, autograd and fake checks
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic") \
        if DEVICE == "cuda" else ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.flf2v.wan_self_attention.default, (*args, EPS, 2), test_utils=utils)
    torch.library.opcheck(torch.ops.flf2v.wan_cross_attention.default, (q, *kv, 2), test_utils=utils)

    class Block(torch.nn.Module):
        def forward(self, q, k, v, wq, wk, cos, sin, kt, vt, ki, vi):
            x = torch.ops.flf2v.wan_self_attention(q, k, v, wq, wk, cos, sin, EPS)
            return torch.ops.flf2v.wan_cross_attention(x, kt, vt, ki, vi, 2)

    meta = [t.to("meta") for t in (*args, *kv)]  # the fake implementations alone
    ep = torch.export.export(Block(), tuple(meta))
    targets = {str(n.target) for n in ep.graph.nodes}
    assert {"flf2v.wan_self_attention.default", "flf2v.wan_cross_attention.default"} <= targets, targets
    compiled = torch.compile(Block(), backend="eager", fullgraph=True)
    assert torch.equal(compiled(*args, *kv), Block()(*args, *kv))


def test_errors():
    q, k, v, wq, wk, cos, sin = self_inputs(1, 8, 2, 32, torch.float32)
    bad = [((q, k[:, :7], v, wq, wk, cos, sin, EPS, 2), "k must have shape"),
           ((q, k, v.half(), wq, wk, cos, sin, EPS, 2), "v must be torch.float32"),
           ((q, k, v, wq[:63], wk, cos, sin, EPS, 2), "norm_q_weight must be"),
           ((q, k, v, wq, wk, cos[:, :8], sin, EPS, 2), "cos must be"),
           ((q, k, v, wq, wk, cos, sin, EPS, 3), "not divisible by num_heads 3"),
           ((q, k, v, wq, wk, cos[:, :4].contiguous(), sin[:, :4].contiguous(), EPS, 8), "power of two >= 16"),
           ((q.transpose(1, 2).contiguous().transpose(1, 2), k, v, wq, wk, cos, sin, EPS, 2), "contiguous along")]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            attention.wan_self_attention(*args)
        with pytest.raises(ValueError, match=msg):  # the fake implementation checks alike
            torch.ops.flf2v.wan_self_attention(*[a.to("meta") if torch.is_tensor(a) else a for a in args])
    with pytest.raises(ValueError, match="out must be"):
        attention.wan_self_attention(q, k, v, wq, wk, cos, sin, EPS, 2, out=poisoned((1, 8, 64), torch.float16))
    with pytest.raises(ValueError, match="v_img must have shape"):
        cross_attention.wan_cross_attention(q, k, v, k, v[:, :5], 2)


# ---- TensorRT plugin --------------------------------------------------------------------------------

def test_trt_plugin_without_tensorrt():
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="need TensorRT >= 10.9"):
        trt_plugin.register_plugins()


AOT_SCRIPT = """
import os, subprocess, torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from flf2v.kernels import attention, cross_attention, ops, trt_plugin

# Compiled kernels refuse CPU tensors with a clear error instead of crashing.
x = torch.zeros(1, 4, 64)
try:
    torch.ops.flf2v.wan_cross_attention(x, x, x, x, x, 2)
    raise SystemExit("no error on CPU tensors without the interpreter")
except RuntimeError as err:
    assert "TRITON_INTERPRET=1" in str(err), err

# Both plugin kernels compile for Hopper, and TensorRT's PTX (hidden scratch parameters dropped) assembles.
target = GPUTarget("cuda", 90, 32)
for compile_fn, config in ((trt_plugin.compile_self_attention, attention.SELF_ATTN_CONFIGS[0]),
                           (trt_plugin.compile_cross_attention, cross_attention.CROSS_ATTN_CONFIGS[0])):
    kernel = compile_fn("bf16", 5120, 40, config, target)
    name, ptx = trt_plugin.aot_ptx(kernel)
    isa = trt_plugin.ptx_isa(90)
    assert f".version {isa // 10}.{isa % 10}".encode() in ptx and b"wgmma" in ptx, ptx[:400]
    assert kernel.metadata.shared <= 232448, kernel.metadata
    path = f"/tmp/flf2v_{name.decode()}_{os.getpid()}.ptx"
    open(path, "wb").write(ptx)
    subprocess.run([get_ptxas(90).path, "-arch=sm_90a", path, "-o", os.devnull], check=True)
    os.remove(path)
print("ok")
"""


def test_trt_aot_compile_for_hopper():
    """Runs without the interpreter in a subprocess: the plugin's AOT path compiles on a CPU machine."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(AOT_SCRIPT)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.gpu
def test_trt_plugins_in_engine():
    """Both AOT plugins inside a TensorRT engine agree with the torch ops (needs CUDA and TensorRT)."""
    if not GPU:
        pytest.skip("needs CUDA and the compiled (not interpreted) kernels")
    trt = pytest.importorskip("tensorrt")
    pytest.importorskip("polygraphy")
    import numpy as np
    import tensorrt.plugin as trtp
    from polygraphy.backend.trt import CreateConfig, TrtRunner, create_network, engine_from_network

    trt_plugin.register_plugins()
    dtype, b, s, h, d = torch.float16, 1, 333, 2, 128
    q, k, v, wq, wk, cos, sin = self_inputs(b, s, h, d, dtype)
    g = torch.Generator().manual_seed(3)
    kt, vt, ki, vi = (torch.randn(b, n, h * d, generator=g).to(DEVICE, dtype) for n in (512, 512, 514, 514))
    feeds = dict(q=q, k=k, v=v, wq=wq, wk=wk, cos=cos, sin=sin, rq=attention.rms_stats(q, EPS),
                 rk=attention.rms_stats(k, EPS), kt=kt, vt=vt, ki=ki, vi=vi)
    builder, network = create_network(strongly_typed=True)
    types = {torch.float16: trt.float16, torch.float32: trt.float32}
    t = {n: network.add_input(name=n, dtype=types[x.dtype], shape=tuple(x.shape)) for n, x in feeds.items()}
    heads = np.array([h], np.int32)  # the plugins' num_heads attribute (trt_plugin.Heads)
    attn = network.add_plugin(trtp.op.flf2v.wan_self_attention(
        t["q"], t["k"], t["v"], t["wq"], t["wk"], t["cos"], t["sin"], t["rq"], t["rk"], num_heads=heads), aot=True)
    cross = network.add_plugin(trtp.op.flf2v.wan_cross_attention(
        attn.get_output(0), t["kt"], t["vt"], t["ki"], t["vi"], num_heads=heads), aot=True)
    for layer, name in ((attn, "x"), (cross, "y")):
        layer.get_output(0).name = name
        network.mark_output(layer.get_output(0))
    with TrtRunner(engine_from_network((builder, network), CreateConfig())) as runner:
        out = runner.infer(feeds)
    x, y = (torch.as_tensor(out[n]).to(DEVICE) for n in ("x", "y"))
    check("TensorRT self-attention plugin", x, torch.ops.flf2v.wan_self_attention(q, k, v, wq, wk, cos, sin, EPS, h),
          TOL[dtype])
    check("TensorRT cross-attention plugin", y, torch.ops.flf2v.wan_cross_attention(x, kt, vt, ki, vi, h), TOL[dtype])


def test_largest_tactic_only_when_asked(monkeypatch):
    """FLF2V_PLUGIN_TACTICS=largest (gpu-check's trt_tiny part) offers only the fitting tactic with the most
    dynamic shared memory, so the engine has to launch it; unset, every fitting tactic."""
    from types import SimpleNamespace
    shared = {1: 90_000, 2: 220_000, 3: 300_000, 4: 40_000}  # bytes per tactic; 3 does not fit in 232,448
    monkeypatch.setattr(trt_plugin, "build_target", lambda: (SimpleNamespace(arch=90), 232_448))
    monkeypatch.setattr(trt_plugin, "tactic_configs", lambda kind, dtype: [None] * 4)
    monkeypatch.setattr(trt_plugin, "_kernel", lambda kind, dtype, dim, heads, t, target:
                        SimpleNamespace(metadata=SimpleNamespace(shared=shared[t])))
    monkeypatch.delenv("FLF2V_PLUGIN_TACTICS", raising=False)
    assert trt_plugin.tactics("self", "bf16", 5120, 40) == [1, 2, 4]
    monkeypatch.setenv("FLF2V_PLUGIN_TACTICS", "largest")
    assert trt_plugin.tactics("self", "bf16", 5120, 40) == [2]
