"""Part 8 of `make gpu-check`: 8-bit at the 720p token count. The FP8 block linears (models/quant.py:
torch._scaled_mm, per-channel weight and per-token activation scales) against the bf16 ones on the 14B's
linear shapes, and the 8-bit self-attention (kernels/sage_attention.py) against the exact fused kernel, each
timed and compared with the bf16 result. Box-safe at import: stdlib only."""
from __future__ import annotations

from flf2v.bench.gpu_common import Skip, check, cosine, free_cuda, log, model_preset, short_of, timed_s, tokens_of

# (name, in, out) of one block's linears: q/k/v/o and the cross-attention q/o share the first shape
LINEARS = (("attn", "dim", "dim"), ("ffn.0", "dim", "ffn_dim"), ("ffn.2", "ffn_dim", "dim"))
# fp8 vs bf16 layer output: e4m3's half ulp is 2^-4 per operand; measured on the CPU (models/quant.py
# tests) ~0.037 mean over random layers: gate at 2x that, and cosine
FP8_REL_L2, FP8_COS = 0.08, 0.995
SAGE_COS, SAGE_L1 = 0.999, 0.03  # tests/test_sage.py's exact-attention bounds (0.9998, 0.02) with GPU slack


def _rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def _linear_rows(run, cfg, tokens: int, dtype, reps: int) -> tuple[dict, list[str]]:
    import torch

    from flf2v.models.quant import FP8Linear
    rows, problems = {}, []
    g = torch.Generator(device=run.device).manual_seed(0)
    for name, cin, cout in LINEARS:
        cin, cout = getattr(cfg, cin), getattr(cfg, cout)
        with torch.no_grad():
            lin = torch.nn.Linear(cin, cout, device=run.device, dtype=dtype)
            fp8 = FP8Linear.from_linear(lin)
            x = torch.randn(1, tokens, cin, device=run.device, dtype=dtype, generator=g)
            ref, got = lin(x), fp8(x)
            t16, _ = timed_s(run, lambda: lin(x), reps)
            t8, _ = timed_s(run, lambda: fp8(x), reps)
        row = rows[name] = {"in": cin, "out": cout, "ref_ms": t16 * 1e3, "fp8_ms": t8 * 1e3,
                            "speedup": t16 / t8, "rel_l2": _rel_l2(got, ref), "cosine": cosine(got, ref)}
        log(f"quant: {name} {tokens}x{cin}->{cout}: {str(dtype)[6:]} {row['ref_ms']:.2f} ms, "
            f"fp8 {row['fp8_ms']:.2f} ms "
            f"({row['speedup']:.2f}x), rel L2 {row['rel_l2']:.4f}, cos {row['cosine']:.5f}")
        if not (row["rel_l2"] <= FP8_REL_L2 and row["cosine"] >= FP8_COS):
            problems.append(f"fp8 {name}: rel L2 {row['rel_l2']:.3g} (<= {FP8_REL_L2}), cos {row['cosine']:.5f} "
                            f"(>= {FP8_COS})")
        free_cuda(run)
    return rows, problems


def _attention_row(run, cfg, tokens: int, dtype, reps: int) -> tuple[dict, list[str]]:
    import torch

    from flf2v.kernels import attention, sage_attention
    g = torch.Generator(device=run.device).manual_seed(1)
    dim, d = cfg.dim, cfg.head_dim
    q, k, v = (torch.randn(1, tokens, dim, device=run.device, dtype=dtype, generator=g) for _ in range(3))
    w = torch.ones(dim, device=run.device, dtype=torch.float32)
    pos = torch.arange(tokens, device=run.device, dtype=torch.float32)[:, None]
    ang = pos * 10000.0 ** (-torch.arange(d // 2, device=run.device) / (d // 2))
    args = (q, k, v, w, w, ang.cos(), ang.sin(), cfg.eps)
    with torch.no_grad():
        exact = attention.wan_self_attention(*args)
        eight = sage_attention.wan_sage_self_attention(*args)
        t_exact, _ = timed_s(run, lambda: attention.wan_self_attention(*args), reps)
        t_sage, _ = timed_s(run, lambda: sage_attention.wan_sage_self_attention(*args), reps)
    l1 = float((eight.float() - exact.float()).abs().sum() / exact.float().abs().sum())
    row = {"tokens": tokens, "heads": dim // d, "head_dim": d, "exact_ms": t_exact * 1e3, "sage_ms": t_sage * 1e3,
           "speedup": t_exact / t_sage, "cosine": cosine(eight, exact), "rel_l1": l1}
    log(f"quant: self-attention L={tokens}: exact {row['exact_ms']:.1f} ms, sage {row['sage_ms']:.1f} ms "
        f"({row['speedup']:.2f}x), cos {row['cosine']:.5f}, rel L1 {l1:.4f}")
    ok = row["cosine"] >= SAGE_COS and l1 <= SAGE_L1
    return row, [] if ok else [f"sage attention: cos {row['cosine']:.5f} (>= {SAGE_COS}), rel L1 {l1:.3g} "
                               f"(<= {SAGE_L1})"]


def part_quant(run, data: dict, part_end: float) -> None:
    import torch
    if not run.smoke and torch.cuda.get_device_capability(run.device) < (8, 9):
        raise Skip("FP8 GEMMs need sm89+ (Ada, Hopper)")
    preset = model_preset(run)
    shape = "tiny" if run.smoke else "720p"
    tokens = tokens_of(preset, shape)[0]
    dtype = torch.float32 if run.smoke else torch.bfloat16
    reps = 1 if run.smoke else (3 if run.args.quick else 10)
    data.update(shape=shape, tokens=tokens, dtype=str(dtype).removeprefix("torch."))
    data["linears"], problems = _linear_rows(run, preset.dit, tokens, dtype, reps)
    why = short_of(run, part_end, 5 if run.smoke else 60)  # the Triton kernels compile and autotune first
    if why:
        data["attention"] = {"skipped": why}
    else:
        data["attention"], more = _attention_row(run, preset.dit, tokens, dtype, reps)
        problems += more
    check(problems)
