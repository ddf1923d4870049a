"""GPU benchmark of the fused Triton attention kernels against torch SDPA (needs CUDA).

    python -m flf2v.bench.kernels                      # the FLF2V-14B 720p shapes: L 75,600, 40 heads of 128
    python -m flf2v.bench.kernels --seq 8192 --dtype fp16

FLOPs counted: self-attention 4 * B * H * L^2 * D (QK^T and PV), cross-attention 4 * B * H * Lq * (Lt + Li) * D.
Rows: the Triton kernels (self-attention with k normed in a pre-pass or as tiles load), torch SDPA alone
on already normed and rotated q', k' (the attention a fused kernel has to beat), the full PyTorch reference
(RMSNorm + RoPE + SDPA), and cross-attention against two SDPA calls. Times are medians of
triton.testing.do_bench (L2 flushed between runs); errors are max |a - b| / max |b| against the reference.
"""
import argparse

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def bench_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=50, rep=500, return_mode="median")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def row(name: str, ms: float, flops: float, err: float | None = None) -> None:
    err_s = "" if err is None else f"   rel err {err:.2e}"
    print(f"  {name:<44} {ms:9.3f} ms {flops / ms * 1e-9:8.1f} TFLOP/s{err_s}")


def bench_self(b: int, s: int, h: int, d: int, dtype: torch.dtype) -> None:
    from flf2v.kernels import attention
    dim = h * d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, dim, device="cuda", generator=g).to(dtype) for _ in range(3))
    wq, wk = ((1 + 0.1 * torch.randn(dim, device="cuda", generator=g)).to(dtype) for _ in range(2))
    angle = torch.rand(s, d // 2, device="cuda", generator=g) * 100
    cos, sin = angle.cos(), angle.sin()
    args = (q, k, v, wq, wk, cos, sin, 1e-6, h)
    flops = 4.0 * b * h * s * s * d
    print(f"self-attention B={b} L={s} H={h} D={d} {dtype}: {flops:.3g} FLOP")

    ref = attention.wan_self_attention_ref(*args)
    for fuse_k in (False, True):
        out = attention.wan_self_attention(*args, fuse_k=fuse_k)  # autotunes on first call
        ms = bench_ms(lambda: attention.wan_self_attention(*args, fuse_k=fuse_k))
        row(f"triton fused (fuse_k={fuse_k})", ms, flops, rel_err(out, ref))
    ms = bench_ms(lambda: attention.wan_self_attention_ref(*args))
    row("torch reference (norm + rope + SDPA)", ms, flops)
    qh, kh, vh = (x.view(b, s, h, d).transpose(1, 2) for x in (q, k, v))
    ms = bench_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh))
    row("torch SDPA alone (q', k' precomputed)", ms, flops)
    rq = attention.rms_stats(q, 1e-6)
    ms = bench_ms(lambda: attention.rms_stats(q, 1e-6))
    print(f"  {'rms_stats pre-pass (per tensor)':<44} {ms:9.3f} ms {q.nbytes / ms * 1e-9:8.1f} TB/s")
    ms = bench_ms(lambda: attention.norm_rope(k, rq, wk, cos, sin, h))
    print(f"  {'norm_rope pre-pass (k, fuse_k=False)':<44} {ms:9.3f} ms {2 * k.nbytes / ms * 1e-9:8.1f} TB/s")


def bench_cross(b: int, lq: int, lt: int, li: int, h: int, d: int, dtype: torch.dtype) -> None:
    from flf2v.kernels import cross_attention
    dim = h * d
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(b, lq, dim, device="cuda", generator=g).to(dtype)
    kt, vt, ki, vi = (torch.randn(b, n, dim, device="cuda", generator=g).to(dtype) for n in (lt, lt, li, li))
    args = (q, kt, vt, ki, vi, h)
    flops = 4.0 * b * h * lq * (lt + li) * d
    print(f"cross-attention B={b} Lq={lq} Lt={lt} Li={li} H={h} D={d} {dtype}: {flops:.3g} FLOP")
    ref = cross_attention.wan_cross_attention_ref(*args)
    out = cross_attention.wan_cross_attention(*args)
    row("triton fused (text + image, one launch)", bench_ms(lambda: cross_attention.wan_cross_attention(*args)),
        flops, rel_err(out, ref))
    row("torch reference (two SDPA + add)", bench_ms(lambda: cross_attention.wan_cross_attention_ref(*args)), flops)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=75600, help="video tokens (21x45x80 latent patches at 720p)")
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--text", type=int, default=512)
    p.add_argument("--image", type=int, default=514, help="514 (flf2v) or 257 (i2v)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py needs a CUDA GPU")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "(H100/H200 SXM dense bf16 peak: 989 TFLOP/s)")
    dtype = DTYPES[args.dtype]
    bench_self(args.batch, args.seq, args.heads, args.head_dim, dtype)
    bench_cross(args.batch, args.seq, args.text, args.image, args.heads, args.head_dim, dtype)


if __name__ == "__main__":
    main()
