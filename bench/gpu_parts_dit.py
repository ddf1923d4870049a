"""Parts 5, 8 and 9 of `make gpu-check`, at the flf2v-14B's width and the 720p token count: the DiT slice, 8-bit
(models/quant.py, kernels/sage_attention.py) and streamed blocks (runtime/offload.py). Box-safe at import."""
from __future__ import annotations

import dataclasses

from flf2v.bench.gpu_common import (Skip, build_random_dit, check, cosine, dtype_of, errors, free_cuda, log,
                                    model_preset, short_of, slice_inputs, timed_call, timed_s, tokens_of,
                                    torch_denoiser, video_shapes)

SLICE_BACKENDS = {"sdpa": "torch eager (SDPA)", "triton": "torch + Triton kernels"}
TRT_ROW = "TensorRT engine (bf16)"


# ---- 5. full-width DiT slice ---------------------------------------------------------------------------

def _floor(run, preset, shape) -> tuple[float, str]:
    from flf2v.bench.cost import GPUS, floors, video_costs
    name = (run.results["machine"].get("gpu") or "").upper() if run.cuda else ""
    key = next((k for k in GPUS if k in name), None)
    label = f"{GPUS[key or 'H100'].name} floor" + ("" if key or not run.cuda else
                                                   " (this GPU is not in bench/cost.py's table)")
    costs = video_costs(preset, shape.width, shape.height, shape.frame_num, preset.sample_steps)
    return floors(costs)["denoise"][f"{key or 'H100'} bf16"], label


def _time_slice(run, model, inputs, reps: int):
    """One backend's slice forward: the first call (autotuning), the forward's and block 0's times (its inputs
    caught by a hook), peak memory; (row, output)."""
    import torch
    caught, row = {}, {}
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a, kw: caught.update(a=a, kw=kw), with_kwargs=True)
    try:
        with torch.no_grad():
            if run.cuda:
                torch.cuda.reset_peak_memory_stats()
            # warm-up (the Triton kernels autotune here unless part 2 did at this L)
            out = timed_call(run, row, "first_call_s", model, *inputs)
            first = row["first_call_s"]
            # the Triton interpreter takes seconds a call: in the smoke the first call is the timing
            row["forward_s"], row["forward_runs_s"] = ((first, [first]) if run.smoke else
                                                       timed_s(run, lambda: model(*inputs), reps))
            row["block_s"], _ = timed_s(run, lambda: model.blocks[0](*caught["a"], **caught["kw"]), reps)
    finally:
        hook.remove()
    if run.cuda:
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row | {"finite": bool(torch.isfinite(out).all())}, out


def _extrapolate(row: dict, outside: float, per_block: float, d: dict) -> None:
    row["full_forward_s"] = outside + d["of_blocks"] * per_block
    row["video_denoise_s"] = d["forwards_per_video"] * row["full_forward_s"]
    row["vs_floor"] = row["video_denoise_s"] / d["floor_s"]


def part_dit_slice(run, data: dict, part_end: float) -> None:
    from flf2v.bench.cost import dit_forward_flops, dit_layer_flops
    from flf2v.bench.gpu_parts_engines import trt_slice
    preset, n = model_preset(run), 2
    full = preset.dit
    slice_cfg = dataclasses.replace(full, num_layers=n)
    shape_name = video_shapes(run)[0]
    L, latent, shape = tokens_of(preset, shape_name)
    dtype, dtype_name = dtype_of(run)
    floor_s, floor_label = _floor(run, preset, shape)
    forwards = 2 * preset.sample_steps  # classifier-free guidance: cond + uncond per step
    data.update(model=preset.name, blocks=n, of_blocks=full.num_layers, dim=full.dim, heads=full.num_heads,
                ffn_dim=full.ffn_dim, shape=shape_name, latent=list(latent), tokens=L, text_tokens=full.text_len,
                image_tokens=full.clip_tokens, dtype=dtype_name, batch=1, steps=preset.sample_steps,
                reps=1 if run.smoke else (2 if run.args.quick else 3), forwards_per_video=forwards, backends={},
                floor_s=floor_s, floor=f"{floor_label}, bf16 dense, {forwards} forwards (bench/cost.py)",
                forward_flops_full=dit_forward_flops(full, latent), block_flops=sum(dit_layer_flops(full, L).values()),
                note=f"extrapolated: full forward = (slice forward - {n} x block) + {full.num_layers} x block; video "
                     f"= {forwards} forwards (B=1 each; the runtime batches cond+uncond)")
    model = timed_call(run, data, "build_s", build_random_dit, slice_cfg, dtype, run.device)
    data.update(params=sum(p.numel() for p in model.parameters()),
                weights_gib=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30)
    inputs, outputs, problems = slice_inputs(run, slice_cfg, latent), {}, []
    for kind, name in SLICE_BACKENDS.items():
        if reason := short_of(run, part_end, 30):
            data["backends"][name] = {"skipped": reason}
            continue
        model.attention = kind
        row, outputs[kind] = _time_slice(run, model, inputs, data["reps"])
        row.update(block_tflops=data["block_flops"] / row["block_s"] / 1e12,
                   outside_blocks_s=max(row["forward_s"] - n * row["block_s"], 0.0))
        _extrapolate(row, row["outside_blocks_s"], row["block_s"], data)
        row["full_forward_tflops"] = data["forward_flops_full"] / row["full_forward_s"] / 1e12
        data["backends"][name] = row
        log(f"dit_slice: {name}: forward ({n} blocks) {row['forward_s'] * 1e3:.1f} ms, block {row['block_s'] * 1e3:.1f} "
            f"ms ({row['block_tflops']:.0f} TFLOP/s); {full.num_layers}-block forward ~{row['full_forward_s']:.2f} s; "
            f"{data['steps']}-step video ~{row['video_denoise_s']:.0f} s (extrapolated) vs floor {floor_s:.0f} s")
        problems.append(None if row["finite"] else f"{name}: non-finite output")
    if len(outputs) == 2:
        e = data["triton_vs_sdpa"] = errors(outputs["triton"], outputs["sdpa"]) | {
            "tol": 1e-4 if run.smoke else 5e-2}
        problems.append(None if e["max_rel"] <= e["tol"] else f"Triton vs SDPA slice output: max rel "
                                                              f"{e['max_rel']:.3g} > {e['tol']:g}")
    outputs.clear()
    trt = data["backends"][TRT_ROW] = trt_slice(run, model, slice_cfg, preset, shape, inputs, part_end)
    if "error" in trt:
        problems.append(f"TensorRT slice: {trt['error']}")
    elif "forward_s" in trt:
        sdpa = data["backends"].get(SLICE_BACKENDS["sdpa"], {})
        outside = sdpa.get("outside_blocks_s", 0.0)
        _extrapolate(trt, outside, (max(trt["forward_s"] - outside, 0.0) if sdpa.get("block_s") else trt["forward_s"])
                     / n, data)
    check(problems)


# ---- 8. FP8 linears and sage attention -----------------------------------------------------------------

# (name, in, out) of one block's linears: q/k/v/o and the cross-attention q/o share the first shape
LINEARS = (("attn", "dim", "dim"), ("ffn.0", "dim", "ffn_dim"), ("ffn.2", "ffn_dim", "dim"))
# fp8 vs bf16 layer output: e4m3's half ulp is 2^-4 per operand; measured on the CPU (models/quant.py
# tests) ~0.037 mean over random layers: gate at 2x that, and cosine
FP8_REL_L2, FP8_COS = 0.08, 0.995
SAGE_COS, SAGE_L1 = 0.999, 0.03  # tests/test_sage.py's exact-attention bounds (0.9998, 0.02) with GPU slack


def _linear_row(run, cin: int, cout: int, tokens: int, dtype, g, reps: int) -> dict:
    import torch

    from flf2v.models.quant import FP8Linear
    with torch.no_grad():
        lin = torch.nn.Linear(cin, cout, device=run.device, dtype=dtype)
        fp8 = FP8Linear.from_linear(lin)
        x = torch.randn(1, tokens, cin, device=run.device, dtype=dtype, generator=g)
        ref, got = lin(x), fp8(x)
        t16, _ = timed_s(run, lambda: lin(x), reps)
        t8, _ = timed_s(run, lambda: fp8(x), reps)
    rel_l2 = float((got.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30))
    return {"in": cin, "out": cout, "ref_ms": t16 * 1e3, "fp8_ms": t8 * 1e3, "speedup": t16 / t8, "rel_l2": rel_l2,
            "cosine": cosine(got, ref)}


def _attention_row(run, cfg, tokens: int, dtype, reps: int) -> dict:
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
    return {"tokens": tokens, "heads": dim // d, "head_dim": d, "exact_ms": t_exact * 1e3, "sage_ms": t_sage * 1e3,
            "speedup": t_exact / t_sage, "cosine": cosine(eight, exact),
            "rel_l1": float((eight.float() - exact.float()).abs().sum() / exact.float().abs().sum())}


def part_quant(run, data: dict, part_end: float) -> None:
    import torch
    if not run.smoke and torch.cuda.get_device_capability(run.device) < (8, 9):
        raise Skip("FP8 GEMMs need sm89+ (Ada, Hopper)")
    preset = model_preset(run)
    shape = "tiny" if run.smoke else "720p"
    tokens = tokens_of(preset, shape)[0]
    dtype, dtype_name = dtype_of(run)
    reps = 1 if run.smoke else (3 if run.args.quick else 10)
    data.update(shape=shape, tokens=tokens, dtype=dtype_name, linears={})
    g, problems = torch.Generator(device=run.device).manual_seed(0), []
    for name, cin, cout in LINEARS:
        r = data["linears"][name] = _linear_row(run, getattr(preset.dit, cin), getattr(preset.dit, cout), tokens,
                                                dtype, g, reps)
        log(f"quant: {name} {tokens}x{r['in']}->{r['out']}: {dtype_name} {r['ref_ms']:.2f} ms, fp8 {r['fp8_ms']:.2f} "
            f"ms ({r['speedup']:.2f}x), rel L2 {r['rel_l2']:.4f}, cos {r['cosine']:.5f}")
        if not (r["rel_l2"] <= FP8_REL_L2 and r["cosine"] >= FP8_COS):
            problems.append(f"fp8 {name}: rel L2 {r['rel_l2']:.3g} (<= {FP8_REL_L2}), cos {r['cosine']:.5f} "
                            f"(>= {FP8_COS})")
        free_cuda(run)
    if why := short_of(run, part_end, 5 if run.smoke else 60):  # the Triton kernels compile and autotune first
        data["attention"] = {"skipped": why}
    else:
        a = data["attention"] = _attention_row(run, preset.dit, tokens, dtype, reps)
        log(f"quant: self-attention L={tokens}: exact {a['exact_ms']:.1f} ms, sage {a['sage_ms']:.1f} ms "
            f"({a['speedup']:.2f}x), cos {a['cosine']:.5f}, rel L1 {a['rel_l1']:.4f}")
        if not (a["cosine"] >= SAGE_COS and a["rel_l1"] <= SAGE_L1):
            problems.append(f"sage attention: cos {a['cosine']:.5f} (>= {SAGE_COS}), rel L1 {a['rel_l1']:.3g} "
                            f"(<= {SAGE_L1})")
    check(problems)


# ---- 9. streamed blocks --------------------------------------------------------------------------------

OFFLOAD_BLOCKS = 4  # of the 14B's 40: two slots plus two more, so copies into both slots overlap compute


def part_offload(run, data: dict, part_end: float) -> None:
    """Every block streamed (blocks:0, README's Memory plans), each copy hidden behind the previous block's
    compute; bit-identical to resident. One block's copy is timed alone (the cost model assumes 25 GB/s)."""
    import torch

    from flf2v.runtime.offload import stream_blocks
    preset = model_preset(run)
    shape = "tiny" if run.smoke else "720p"
    tokens, latent, _ = tokens_of(preset, shape)
    cfg = dataclasses.replace(preset.dit, num_layers=OFFLOAD_BLOCKS)
    dtype, dtype_name = dtype_of(run)
    reps = 1 if run.smoke else 3
    dit = build_random_dit(cfg, dtype, run.device)
    args = slice_inputs(run, cfg, latent)
    denoise = torch_denoiser(dit, dtype, run.device)
    with torch.no_grad():
        ref = denoise(*args)
        t_resident, _ = timed_s(run, lambda: denoise(*args), reps)
        streamed = stream_blocks(dit, 0, run.device)  # every block from host memory through the two slots
        free_cuda(run)
        got = denoise(*args)
        t_streamed, _ = timed_s(run, lambda: denoise(*args), reps)
        t_copy, _ = timed_s(run, lambda: streamed._fetch(0), reps)
    block_bytes = sum(t.nbytes for t in streamed.host[0])
    data.update(model=preset.name, shape=shape, tokens=tokens, blocks=OFFLOAD_BLOCKS, dtype=dtype_name,
                block_bytes=block_bytes, pinned_bytes=streamed.pinned_bytes, resident_s=t_resident,
                streamed_s=t_streamed, overhead=t_streamed / t_resident - 1, block_copy_s=t_copy,
                copy_gb_s=block_bytes / t_copy / 1e9, device_block_bytes=streamed.device_bytes(),
                max_abs=float((got.float() - ref.float()).abs().max()))
    log(f"offload: {OFFLOAD_BLOCKS} blocks at {tokens} tokens: resident {t_resident:.3f} s, all streamed "
        f"{t_streamed:.3f} s ({data['overhead']:+.1%}); one block's copy {t_copy * 1e3:.1f} ms "
        f"({data['copy_gb_s']:.1f} GB/s)")
    check([] if torch.equal(got, ref) else [f"streamed blocks differ from resident: max abs {data['max_abs']:.3g}"])
