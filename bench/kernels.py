"""`flf2v-bench kernels [--seq 75600] [--dtype bf16]`: the fused Triton attention kernels against torch SDPA
(needs CUDA; `make gpu-check` runs the same rows). Default: the FLF2V-14B 720p shapes, L 75,600, 40 heads of 128.

FLOPs counted: self-attention 4 * B * H * L^2 * D (QK^T and PV), cross-attention 4 * B * H * Lq * (Lt + Li) * D.
Rows: the Triton kernels, torch SDPA alone on already normed and rotated q', k' (what a fused kernel has to
beat), the full PyTorch reference (RMSNorm + RoPE + SDPA; cross-attention: two SDPA calls). Times: medians of
triton.testing.do_bench on CUDA (L2 flushed; the first Triton call autotunes and is timed apart), of
perf_counter on a CPU (the Triton interpreter: a smoke test). Errors: max |a - b| / max |b| against the
PyTorch reference, and against fp64 maths on a sample of query rows (q', k' rounded as the kernels' spec says).
"""
from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

from .measure import BadInput, timed
from .report import Report, num, table

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EPS = 1e-6


def add_args(ap) -> None:
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=75600, help="video tokens (21x45x80 latent patches at 720p)")
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--image", type=int, default=514, help="514 (flf2v) or 257 (i2v)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")


def errors(a: torch.Tensor, b: torch.Tensor) -> dict:
    """{"max_abs": max |a - b|, "max_rel": max |a - b| / max |b|} of a against the reference b."""
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    return {"max_abs": err, "max_rel": err / max(b.abs().max().item(), 1e-30)}


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
    """softmax(q k^T / sqrt(D)) v in fp64 for query rows `rows` of q, k, v [B, L, H, D] -> [B, R, H*D], one
    head at a time (the fp64 scores of one head of 256 rows x 75,600 keys: 155 MB)."""
    b, _, _, d = q.shape
    out = [torch.softmax(q[:, rows, i].double() @ k[:, :, i].double().transpose(1, 2) / math.sqrt(d), dim=-1)
           @ v[:, :, i].double() for i in range(h)]
    return torch.stack(out, dim=2).reshape(b, len(rows), h * d)


def sample_rows(s: int, n: int, device) -> torch.Tensor:
    """n query rows of L (all when L <= n): the first, the last (the ragged tail) and random ones between."""
    if s <= n:
        return torch.arange(s, device=device)
    mid = torch.randperm(s - 2, generator=torch.Generator().manual_seed(s))[: n - 2] + 1
    return torch.cat([torch.tensor([0, s - 1]), mid.sort().values]).to(device)


class _Rows:
    """The rows of one shape: each timed, its output compared with the reference and the fp64 rows; on_row(row)
    is told each row, should_stop(name) -> a reason (str) skips it (time budget)."""

    def __init__(self, shape: dict, flops: float, cuda: bool, ref, oracle, rows, on_row, should_stop, timing):
        self.res = {"shape": shape, "flops": flops, "rows": []}
        self.flops, self.cuda, self.ref, self.oracle, self.sample = flops, cuda, ref, oracle, rows
        self.on_row, self.should_stop = on_row, should_stop
        self.timing = dict(warmup_ms=50, rep_ms=500, cpu_reps=3) | timing
        self.first_is_figure = not cuda and self.timing["cpu_reps"] == 0  # CPU: the first call is the figure

    def add(self, row: dict) -> None:
        self.res["rows"].append(row)
        if self.on_row:
            self.on_row(row)

    def skipped(self, name: str) -> bool:
        reason = self.should_stop(name) if self.should_stop else None
        if reason:
            self.add({"name": name, "skipped": reason})
        return bool(reason)

    def ms(self, fn) -> float:
        """Median milliseconds of fn(): triton's do_bench on CUDA, the kernels launched as inside their ops in eager
        (common.eager_launches), not through torch's tracing; perf_counter over cpu_reps runs on a CPU."""
        t = self.timing
        if self.cuda:
            from triton.testing import do_bench

            from flf2v.kernels.common import eager_launches
            with eager_launches():
                return float(do_bench(fn, warmup=t["warmup_ms"], rep=t["rep_ms"], return_mode="median"))
        return statistics.median(timed(fn)[0] * 1e3 for _ in range(max(1, t["cpu_reps"])))

    def row(self, name: str, ms: float, out, vs_reference: bool = True) -> dict:
        r = {"name": name, "ms": ms, "tflops": self.flops / (ms * 1e-3) / 1e12}
        if vs_reference:
            r["vs_reference"] = errors(out, self.ref)
        r["vs_fp64_rows"] = errors(out[:, self.sample], self.oracle)
        return r

    def kernel(self, name: str, fn) -> None:
        """A Triton row: the first call (autotuning on CUDA) timed apart."""
        if self.skipped(name):
            return
        t0 = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        self.add(dict(self.row(name, first_s * 1e3 if self.first_is_figure else self.ms(fn), out),
                      first_call_s=first_s))

    def reference(self, name: str, fn) -> None:
        """The PyTorch reference's row: its output is the reference."""
        if not self.skipped(name):
            self.add(self.row(name, self.ms(fn), self.ref, vs_reference=False))


def bench_self(b: int, s: int, h: int, d: int, dtype: torch.dtype, device="cuda", *, fuse_k=(False, True),
               oracle_n: int = 256, on_row=None, should_stop=None, **timing) -> dict:
    """Self-attention rows at B, L, H, D -> {"shape", "flops", "rows": [...]}."""
    from flf2v.kernels import attention as A
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, s, h * d, device=device, generator=g).to(dtype) for _ in range(3))
    wq, wk = ((1 + 0.1 * torch.randn(h * d, device=device, generator=g)).to(dtype) for _ in range(2))
    angle = torch.rand(s, d // 2, device=device, generator=g) * 100
    cos, sin = angle.cos(), angle.sin()
    args = (q, k, v, wq, wk, cos, sin, EPS, h)
    qh, kh, vh = norm_rope(q, wq, cos, sin, h), norm_rope(k, wk, cos, sin, h), v.view(b, s, h, d)
    sample = sample_rows(s, oracle_n, q.device)
    rows = _Rows({"B": b, "L": s, "H": h, "D": d, "dtype": str(dtype).removeprefix("torch.")}, 4.0 * b * h * s * s * d,
                 q.is_cuda, A.wan_self_attention_ref(*args), oracle_rows(qh, kh, vh, h, sample), sample, on_row,
                 should_stop, timing)
    for fk in fuse_k:
        rows.kernel(f"triton fused (fuse_k={fk})", lambda fk=fk: A.wan_self_attention(*args, fuse_k=fk))
    name = "torch SDPA alone (q', k' precomputed)"
    if not rows.skipped(name):
        qt, kt, vt = (x.transpose(1, 2) for x in (qh, kh, vh))
        out = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).reshape(b, s, h * d)
        rows.add(rows.row(name, rows.ms(lambda: F.scaled_dot_product_attention(qt, kt, vt)), out))
        del qt, kt, vt, out
    del qh, kh
    rows.reference("torch reference (norm + rope + SDPA)", lambda: A.wan_self_attention_ref(*args))
    if not rows.skipped("pre-passes"):
        rk = A.rms_stats(k, EPS)
        for name, fn, nbytes in (("rms_stats pre-pass (per tensor)", lambda: A.rms_stats(k, EPS), k.nbytes),
                                 ("norm_rope pre-pass (k, fuse_k=False)",
                                  lambda: A.norm_rope(k, rk, wk, cos, sin, h), 2 * k.nbytes)):
            ms = rows.ms(fn)
            rows.add({"name": name, "ms": ms, "tbps": nbytes / (ms * 1e-3) / 1e12})
    return rows.res


def bench_cross(b: int, lq: int, lt: int, li: int, h: int, d: int, dtype: torch.dtype, device="cuda", *,
                oracle_n: int = 256, on_row=None, should_stop=None, **timing) -> dict:
    """Cross-attention (text + image keys) rows: the fused kernel and the reference (two SDPA calls + add)."""
    from flf2v.kernels import cross_attention as X
    g = torch.Generator(device=device).manual_seed(1)
    args = (*(torch.randn(b, n, h * d, device=device, generator=g).to(dtype) for n in (lq, lt, lt, li, li)), h)
    q, kt, vt, ki, vi = (x.view(b, -1, h, d) for x in args[:5])
    sample = sample_rows(lq, oracle_n, q.device)
    rows = _Rows({"B": b, "Lq": lq, "Lt": lt, "Li": li, "H": h, "D": d, "dtype": str(dtype).removeprefix("torch.")},
                 4.0 * b * h * lq * (lt + li) * d, q.is_cuda, X.wan_cross_attention_ref(*args),
                 oracle_rows(q, kt, vt, h, sample) + oracle_rows(q, ki, vi, h, sample), sample, on_row, should_stop,
                 timing)
    rows.kernel("triton fused (text + image, one launch)", lambda: X.wan_cross_attention(*args))
    rows.reference("torch reference (two SDPA + add)", lambda: X.wan_cross_attention_ref(*args))
    return rows.res


def format_row(row: dict) -> str:
    if "skipped" in row:
        return f"  {row['name']:<44} skipped: {row['skipped']}"
    if "tbps" in row:
        return f"  {row['name']:<44} {row['ms']:9.3f} ms {row['tbps']:8.2f} TB/s"
    errs = "".join(f"   {k} rel {row[k]['max_rel']:.2e}" for k in ("vs_reference", "vs_fp64_rows") if k in row)
    return f"  {row['name']:<44} {row['ms']:9.3f} ms {row['tflops']:8.1f} TFLOP/s{errs}"


def md_rows(label: str, res: dict) -> list[list]:
    """Table rows (kernel, ms, TFLOP/s or TB/s, rel err vs reference, vs fp64 rows, first call s) of one result."""
    def row(r):
        if "skipped" in r:
            return [f"{label}{r['name']}", f"skipped: {r['skipped']}", "", "", "", ""]
        rate = f"{r['tbps']:.2f} TB/s" if "tbps" in r else num(r.get("tflops"), "{:.1f}")
        return [f"{label}{r['name']}", num(r["ms"], "{:.3f}"), rate,
                *(num(r.get(k, {}).get("max_rel"), "{:.2e}") for k in ("vs_reference", "vs_fp64_rows")),
                num(r.get("first_call_s"), "{:.1f}")]
    return [row(r) for r in res["rows"]]


def run(s) -> Report:
    a = s.args
    if not torch.cuda.is_available():
        raise BadInput("needs a CUDA GPU; run it on a machine with an NVIDIA GPU")
    torch.cuda.init()
    dtype, b, n, h, d = DTYPES[a.dtype], a.batch, a.seq, a.heads, a.head_dim
    s.settle()
    show = lambda r: print(format_row(r))  # noqa: E731
    r = {"self": bench_self(b, n, h, d, dtype, on_row=show),
         "cross": bench_cross(b, n, a.text, a.image, h, d, dtype, on_row=show)}
    return Report("attention kernels", r, [f"B={b} L={n} H={h} D={d} {a.dtype}; cross-attention keys {a.text} text + "
                                           f"{a.image} image; H100/H200 SXM dense bf16 peak: 989 TFLOP/s.", ""]
                  + table(["kernel", "ms", "TFLOP/s", "rel err vs reference", "rel err vs fp64 rows", "first call s"],
                          md_rows("self: ", r["self"]) + md_rows("cross: ", r["cross"])))
