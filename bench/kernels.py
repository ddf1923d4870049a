"""Benchmark of the fused Triton attention kernels against torch SDPA (needs CUDA; `make gpu-check` uses it).

    python -m flf2v.bench.kernels                      # the FLF2V-14B 720p shapes: L 75,600, 40 heads of 128
    python -m flf2v.bench.kernels --seq 8192 --dtype fp16

FLOPs counted: self-attention 4 * B * H * L^2 * D (QK^T and PV), cross-attention 4 * B * H * Lq * (Lt + Li) * D.
Rows: the Triton kernels (self-attention with k normed in a pre-pass or as tiles load), torch SDPA alone
on already normed and rotated q', k' (the attention a fused kernel has to beat), the full PyTorch reference
(RMSNorm + RoPE + SDPA), and cross-attention against two SDPA calls. Times are medians of
triton.testing.do_bench on CUDA (L2 flushed between runs; the first Triton call autotunes and is not timed),
of perf_counter on a CPU (the Triton interpreter: a smoke test of this code, not a measurement). Errors:
max |a - b| and max |a - b| / max |b| against the PyTorch reference (all rows), and against an fp64
computation of the specified maths on a sample of query rows (q', k' rounded to the input dtype where
the kernels' spec rounds them), which judges the kernels and SDPA alike.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EPS = 1e-6


# ---- timing and errors ----------------------------------------------------------------------------

def bench_ms(fn, cuda: bool = True, warmup_ms: float = 50, rep_ms: float = 500, cpu_reps: int = 3) -> float:
    """Median milliseconds of fn(): triton's do_bench on CUDA, perf_counter over cpu_reps runs on a CPU.
    do_bench runs fn ~5 times to estimate, then max(1, warmup/est) and max(1, rep/est) times. The kernels
    launch as they do inside their ops in eager (common.eager_launches), not through torch's tracing wrapper."""
    if cuda:
        from triton.testing import do_bench

        from flf2v.kernels.common import eager_launches
        with eager_launches():
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    times = []
    for _ in range(max(1, cpu_reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def errors(a: torch.Tensor, b: torch.Tensor) -> dict:
    """{"max_abs": max |a - b|, "max_rel": max |a - b| / max |b|} of a against the reference b."""
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    return {"max_abs": err, "max_rel": err / max(b.abs().max().item(), 1e-30)}


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


# ---- inputs and the fp64 oracle -------------------------------------------------------------------

def self_inputs(b: int, s: int, h: int, d: int, dtype: torch.dtype, device, seed: int = 0):
    """Raw q, k, v [B, L, H*D], norm weights [H*D] in dtype, fp32 RoPE tables cos/sin [L, D/2]."""
    dim = h * d
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(b, s, dim, device=device, generator=g).to(dtype) for _ in range(3))
    wq, wk = ((1 + 0.1 * torch.randn(dim, device=device, generator=g)).to(dtype) for _ in range(2))
    angle = torch.rand(s, d // 2, device=device, generator=g) * 100
    return q, k, v, wq, wk, angle.cos(), angle.sin()


def cross_inputs(b: int, lq: int, lt: int, li: int, h: int, d: int, dtype: torch.dtype, device, seed: int = 1):
    dim = h * d
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(b, n, dim, device=device, generator=g).to(dtype) for n in (lq, lt, lt, li, li))


def norm_rope(x, w, cos, sin, h: int, eps: float = EPS) -> torch.Tensor:
    """q' or k' [B, L, H, D] as the kernels specify: RMSNorm over the full dim, rounded to x's dtype before
    the weight, RoPE in fp32, rounded to x's dtype (kernels/attention.py, `wan_self_attention_ref`)."""
    b, s, dim = x.shape
    d = dim // h
    xf = x.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w
    ne, no = n.float().view(b, s, h, d // 2, 2).unbind(-1)
    c, sn = cos.view(1, s, 1, d // 2), sin.view(1, s, 1, d // 2)
    return torch.stack([ne * c - no * sn, ne * sn + no * c], -1).flatten(3).to(x.dtype)


def oracle_rows(q, k, v, h: int, rows: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in fp64 for query rows `rows` of q, k, v [B, L, H, D] -> [B, R, H*D],
    one head at a time (the fp64 scores of one head of 256 rows x 75,600 keys: 155 MB)."""
    b, _, _, d = q.shape
    out = []
    for i in range(h):
        qh, kh, vh = q[:, rows, i].double(), k[:, :, i].double(), v[:, :, i].double()
        p = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)
        out.append(p @ vh)
    return torch.stack(out, dim=2).reshape(b, len(rows), h * d)


def sample_rows(s: int, n: int, device) -> torch.Tensor:
    """n query rows of L (all when L <= n): the first, the last (the ragged tail) and random ones between."""
    if s <= n:
        return torch.arange(s, device=device)
    g = torch.Generator().manual_seed(s)
    mid = torch.randperm(s - 2, generator=g)[: n - 2] + 1
    return torch.cat([torch.tensor([0, s - 1]), mid.sort().values]).to(device)


# ---- benchmarks -----------------------------------------------------------------------------------

def _row(name: str, ms: float | None, flops: float, ref=None, out=None, oracle=None, rows=None) -> dict:
    r = {"name": name, "ms": ms, "tflops": None if ms is None else tflops(flops, ms)}
    if out is not None and ref is not None:
        r["vs_reference"] = errors(out, ref)
    if out is not None and oracle is not None:
        r["vs_fp64_rows"] = errors(out[:, rows], oracle)
    return r


def bench_self(b: int, s: int, h: int, d: int, dtype: torch.dtype, device="cuda", *, fuse_k=(False, True),
               time_reference: bool = True, prepass: bool = True, oracle_n: int = 256, warmup_ms: float = 50,
               rep_ms: float = 500, cpu_reps: int = 3, on_row=None, should_stop=None) -> dict:
    """Self-attention rows at B, L, H, D. on_row(row) is called as each row is done; should_stop(name)
    -> a reason (str) skips the row (time budget). Returns {"shape", "flops", "rows": [...]}."""
    from flf2v.kernels import attention

    def timed(fn):
        return bench_ms(fn, q.is_cuda, warmup_ms, rep_ms, cpu_reps)

    reuse_first = torch.device(device).type != "cuda" and cpu_reps == 0  # CPU: the first call is the figure
    args = (*self_inputs(b, s, h, d, dtype, device), EPS, h)
    q, k, v, wq, wk, cos, sin = args[:7]
    flops = 4.0 * b * h * s * s * d
    res = {"shape": {"B": b, "L": s, "H": h, "D": d, "dtype": str(dtype).removeprefix("torch.")}, "flops": flops,
           "rows": []}

    def add(row):
        res["rows"].append(row)
        if on_row:
            on_row(row)

    ref = attention.wan_self_attention_ref(*args)
    qh, kh = norm_rope(q, wq, cos, sin, h), norm_rope(k, wk, cos, sin, h)
    vh = v.view(b, s, h, d)
    rows = sample_rows(s, oracle_n, q.device)
    oracle = oracle_rows(qh, kh, vh, h, rows)
    for fk in fuse_k:
        name = f"triton fused (fuse_k={fk})"
        reason = should_stop(name) if should_stop else None
        if reason:
            add({"name": name, "skipped": reason})
            continue
        t0 = time.perf_counter()
        out = attention.wan_self_attention(*args, fuse_k=fk)  # the first call autotunes (CUDA, bf16/fp16)
        if q.is_cuda:
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        ms = first_s * 1e3 if reuse_first else timed(lambda: attention.wan_self_attention(*args, fuse_k=fk))
        row = _row(name, ms, flops, ref, out, oracle, rows)
        row["first_call_s"] = first_s  # autotuning (compiles + trial runs of every config) on CUDA
        del out
        add(row)
    name = "torch SDPA alone (q', k' precomputed)"
    if not (should_stop and (reason := should_stop(name))):
        qt, kt, vt = (x.transpose(1, 2) for x in (qh, kh, vh))
        out = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).reshape(b, s, h * d)
        add(_row(name, timed(lambda: F.scaled_dot_product_attention(qt, kt, vt)), flops, ref, out, oracle, rows))
        del qt, kt, vt, out
    else:
        add({"name": name, "skipped": reason})
    del qh, kh
    name = "torch reference (norm + rope + SDPA)"
    if time_reference and not (should_stop and (reason := should_stop(name))):
        add(_row(name, timed(lambda: attention.wan_self_attention_ref(*args)), flops, None, ref, oracle, rows))
    elif time_reference:
        add({"name": name, "skipped": reason})
    if prepass and not (should_stop and should_stop("pre-passes")):
        rk = attention.rms_stats(k, EPS)
        ms = timed(lambda: attention.rms_stats(k, EPS))
        add({"name": "rms_stats pre-pass (per tensor)", "ms": ms, "tbps": k.nbytes / (ms * 1e-3) / 1e12})
        ms = timed(lambda: attention.norm_rope(k, rk, wk, cos, sin, h))
        add({"name": "norm_rope pre-pass (k, fuse_k=False)", "ms": ms, "tbps": 2 * k.nbytes / (ms * 1e-3) / 1e12})
    return res


def bench_cross(b: int, lq: int, lt: int, li: int, h: int, d: int, dtype: torch.dtype, device="cuda", *,
                oracle_n: int = 256, warmup_ms: float = 50, rep_ms: float = 500, cpu_reps: int = 3,
                on_row=None, should_stop=None) -> dict:
    """Cross-attention (text + image keys) rows: the fused kernel and the reference (two SDPA calls + add)."""
    from flf2v.kernels import cross_attention

    def timed(fn):
        return bench_ms(fn, q.is_cuda, warmup_ms, rep_ms, cpu_reps)

    reuse_first = torch.device(device).type != "cuda" and cpu_reps == 0  # CPU: the first call is the figure
    args = (*cross_inputs(b, lq, lt, li, h, d, dtype, device), h)
    q, kt, vt, ki, vi = args[:5]
    flops = 4.0 * b * h * lq * (lt + li) * d
    res = {"shape": {"B": b, "Lq": lq, "Lt": lt, "Li": li, "H": h, "D": d,
                     "dtype": str(dtype).removeprefix("torch.")}, "flops": flops, "rows": []}

    def add(row):
        res["rows"].append(row)
        if on_row:
            on_row(row)

    ref = cross_attention.wan_cross_attention_ref(*args)
    rows = sample_rows(lq, oracle_n, q.device)
    heads = [x.view(b, -1, h, d) for x in (q, kt, vt, ki, vi)]
    oracle = (oracle_rows(heads[0], heads[1], heads[2], h, rows)
              + oracle_rows(heads[0], heads[3], heads[4], h, rows))
    name = "triton fused (text + image, one launch)"
    if not (should_stop and (reason := should_stop(name))):
        t0 = time.perf_counter()
        out = cross_attention.wan_cross_attention(*args)
        if q.is_cuda:
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        ms = first_s * 1e3 if reuse_first else timed(lambda: cross_attention.wan_cross_attention(*args))
        row = _row(name, ms, flops, ref, out, oracle, rows)
        row["first_call_s"] = first_s
        add(row)
    else:
        add({"name": name, "skipped": reason})
    name = "torch reference (two SDPA + add)"
    if not (should_stop and (reason := should_stop(name))):
        add(_row(name, timed(lambda: cross_attention.wan_cross_attention_ref(*args)), flops, None, ref, oracle,
                 rows))
    else:
        add({"name": name, "skipped": reason})
    return res


def format_row(row: dict) -> str:
    if "skipped" in row:
        return f"  {row['name']:<44} skipped: {row['skipped']}"
    if "tbps" in row:
        return f"  {row['name']:<44} {row['ms']:9.3f} ms {row['tbps']:8.2f} TB/s"
    errs = "".join(f"   {k} rel {row[k]['max_rel']:.2e}" for k in ("vs_reference", "vs_fp64_rows") if k in row)
    return f"  {row['name']:<44} {row['ms']:9.3f} ms {row['tflops']:8.1f} TFLOP/s{errs}"


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
    torch.cuda.init()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "(H100/H200 SXM dense bf16 peak: 989 TFLOP/s)")
    dtype = DTYPES[args.dtype]
    b, s, h, d = args.batch, args.seq, args.heads, args.head_dim
    print(f"self-attention B={b} L={s} H={h} D={d} {dtype}: {4.0 * b * h * s * s * d:.3g} FLOP")
    bench_self(b, s, h, d, dtype, on_row=lambda r: print(format_row(r)))
    print(f"cross-attention B={b} Lq={s} Lt={args.text} Li={args.image} H={h} D={d} {dtype}")
    bench_cross(b, s, args.text, args.image, h, d, dtype, on_row=lambda r: print(format_row(r)))


if __name__ == "__main__":
    main()
