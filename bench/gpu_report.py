"""The Markdown report of `make gpu-check`: render_md(results) -> text, one section per part from the results
JSON. Box-safe at import: stdlib only."""
from __future__ import annotations

import math

from flf2v.bench.gpu_common import one_line
from flf2v.bench.report import num, table


def _f(x, fmt="{:.3g}") -> str:
    return num(x, fmt, none="-")


def _note(p: dict) -> str:
    return p.get("error") or p.get("reason") or p.get("note") or ""


def render_md(res: dict) -> str:
    m = res.get("machine", {})
    gpu = m.get("gpu") or "no GPU (CPU smoke run)"
    lines = [f"# gpu-check: {gpu}, {res['started'][:10]}", "",
             f"All figures below come from this one run of `python -m flf2v.bench.gpu_check` on this GPU ({gpu}, sm "
             f"{m.get('capability')}, {m.get('memory_gib')} GiB, driver {m.get('driver')}, CUDA {m.get('cuda_runtime')}; "
             f"torch {m.get('torch')}, triton {m.get('triton')}, Python {m.get('python')}), with random weights; "
             f"nothing is copied from elsewhere. Values marked *extrapolated* are computed from measured ones as "
             f"stated." if res["mode"] == "gpu" else f"**{res['mode']}**: a test of this tool's code on a CPU, not a "
                                                      f"measurement.",
             "", f"Commit {m.get('git_commit')}{' (dirty)' if m.get('git_dirty') else ''}; budget {res['budget_s']:.0f} s; "
                 f"total {_f(res.get('seconds'), '{:.0f}')} s; exit code {res.get('exit_code')}"
                 f"{'; --quick' if res.get('quick') else ''}.", ""]
    order = sorted(res["parts"].items(), key=lambda kv: kv[1]["number"])
    lines += table(["part", "status", "seconds", "planned", "note"],
                   [[f"{p['number']}. {p['title']}", p["status"], _f(p.get("seconds"), "{:.1f}"),
                     p.get("planned_s", "-"), _note(p)] for _, p in order], left=2)
    for key, p in order:
        lines += ["", f"## {p['number']}. {p['title']}: {p['status']}", ""]
        lines += [f"Error: {p['error']}", ""] if p.get("error") else []
        lines += [f"Skipped: {p['reason']}", ""] if p.get("reason") else []
        lines += ["```", p["traceback"].rstrip(), "```", ""] if p.get("traceback") else []
        if p.get("data"):
            try:
                lines += RENDER[key](p["data"], m)
            except Exception as e:  # noqa: BLE001 - a rendering bug must not lose the JSON
                lines.append(f"(could not render this part: {one_line(e)}; see the JSON)")
    return "\n".join(lines) + "\n"


def _md_env(d, m):
    keys = ("gpu", "capability", "memory_gib", "multiprocessors", "driver", "cuda_runtime", "cudnn", "torch", "triton",
            "triton_knobs", "c_compiler", "python", "platform", "flf2v", "TRITON_INTERPRET")
    rows = [[k, m[k]] for k in keys if k in m]
    rows += [["packages present", ", ".join(f"{k} {v}" for k, v in d.get("packages", {}).items() if v)],
             ["packages missing", ", ".join(d.get("missing", [])) or "-"]]
    rows += [[f"**{k}**", d[k]] for k in ("warning", "triton_error") if d.get(k)]
    rows += [[f"`flf2v.{mod}` does not import", err] for mod, err in d.get("project_imports_failing", {}).items()]
    return table(["item", "value"], rows, left=2)


def _md_kernels(d, m):
    from flf2v.bench.kernels import MD_HEADER, md_rows
    out = [f"B = 1, {d['heads']} heads x {d['head_dim']} (dim {d['dim']}), {d['dtype']}; cross-attention keys: "
           f"{d['text_tokens']} text + {d['image_tokens']} image. Times: medians of triton.testing.do_bench; "
           f"errors: max |a - b| / max |b| against the PyTorch reference and against fp64 on 256 sampled query "
           f"rows (tolerance for the Triton rows: {d.get('tolerance_vs_fp64')}). `first call` includes autotuning.", ""]
    for name, e in d.get("shapes", {}).items():
        out += [f"### {name}: {e['tokens']:,} tokens (latent {e['latent']})", ""]
        out += table(MD_HEADER, [r for kind in ("self", "cross") if kind in e for r in md_rows(f"{kind}: ", e[kind])])
        out.append("")
    return out


def _md_graph(d, m):
    return [f"Tiny DiT, latent {d['latent']}, {d['steps']} {d['solver']} steps, guide {d['guide_scale']}; "
            f"{'CUDA graph captured with DenoiseLoop.capture()' if d.get('captured') else d.get('note', '')}.", ""] + table(
        ["dtype", "attention", "cfg_batch", "eager ms/step", "graph ms/step", "speed-up", "max abs diff",
         "max rel diff", "tol"],
        [[c["dtype"], c.get("attention", "sdpa"), c["cfg_batch"], _f(c.get("eager_step_ms"), "{:.3f}"),
          _f(c.get("graph_step_ms"), "{:.3f}"), _f(c.get("speedup"), "{:.1f}") + "x", _f(c.get("max_abs"), "{:.2e}"),
          _f(c.get("max_rel"), "{:.2e}"), _f(c.get("tol"), "{:g}")] for c in d.get("cases", [])], left=2)


def _md_slice(d, m):
    rows = []
    for name, r in d.get("backends", {}).items():
        if "skipped" in r or "error" in r:
            rows.append([name, f"skipped: {r['skipped']}" if "skipped" in r else f"error: {r['error']}"] + [""] * 7)
        else:
            rows.append([name, *(_f(r.get(k), f) for k, f in (
                ("forward_s", "{:.3f}"), ("block_s", "{:.3f}"), ("block_tflops", "{:.0f}"), ("outside_blocks_s", "{:.3f}"),
                ("full_forward_s", "{:.2f}"), ("video_denoise_s", "{:.0f}"), ("vs_floor", "{:.2f}"), ("peak_gib", "{:.1f}")))])
    out = [f"{d['blocks']} of the {d['of_blocks']} blocks of {d['model']} (dim {d['dim']}, {d['heads']} heads, FFN "
           f"{d['ffn_dim']}), random {d['dtype']} weights ({_f(d.get('params'), '{:,}')} parameters, "
           f"{_f(d.get('weights_gib'), '{:.2f}')} GiB), {d['shape']}: {d['tokens']:,} video tokens + "
           f"{d['text_tokens']} text + {d['image_tokens']} image, B = {d['batch']}, median of {d['reps']} runs.", "",
           f"*Extrapolated*: {d.get('note', '')}; floor: {_f(d.get('floor_s'), '{:.0f}')} s ({d.get('floor')}).", ""]
    out += table(["backend", "slice forward s", "block s", "block TFLOP/s", "outside blocks s",
                  "full forward s (extrap.)", f"{d['steps']}-step video s (extrap.)", "x floor", "peak GiB"], rows)
    if "triton_vs_sdpa" in d:
        e = d["triton_vs_sdpa"]
        out += ["", f"Slice output, Triton vs SDPA: max abs {e['max_abs']:.2e}, max rel {e['max_rel']:.2e} "
                    f"(tol {e['tol']:g})."]
    return out


def _md_trt(d, m):
    rows = []
    for v in d.get("variants", []):
        graphs = ", ".join(f"{g} {e['max_rel']:.2e}" for g, e in v.get("graphs", {}).items()) or ", ".join(
            f"dit_b2 {n} {e['max_rel']:.2e}" for n, e in v.get("grids", {}).items())
        rows.append([v["precision"], v["attention"], v.get("shape", "-"), _f(v.get("build_s"), "{:.1f}"), graphs or "-",
                     _f(v.get("min_cosine"), "{:.6f}"), f"{v.get('tol_max_rel', '-')}, {v.get('tol_min_cosine', '-')}",
                     v.get("skipped") or v.get("error") or v.get("problem") or ""])
    out = [f"Backend {d.get('backend')}, graphs {', '.join(d.get('graphs', []))}, {d.get('steps')} denoising steps. "
           f"{d.get('note', '')}", ""]
    out += table(["precision", "attention", "shape", "build s", "max rel err per graph", "min per-step cosine",
                  "tol (rel, cos)", "note"], rows, left=3)
    for v in (v for v in d.get("variants", []) if v.get("grids")):  # one engine at one grid per profile
        tol = v.get("tol_max_rel", math.inf)
        out += ["", f"Dynamic engine ({v['precision']}, attention {v['attention']}): dit_b2 vs the torch reference DiT "
                    f"at the same inputs, one grid per optimization profile (no denoising loop).", ""]
        out += table(["grid", "video (frames, H, W)", "latent (T, h, w)", "dims (T, hp, wp)", "profile", "max abs err",
                      "max rel err", "tol"],
                     [[n, " x ".join(map(str, e["video"])), " x ".join(map(str, e["latent"])),
                       " x ".join(str(x) for x in e["dims"].values()), e["profile"], f"{e['max_abs']:.2e}",
                       f"{e['max_rel']:.2e}" + ("" if e["max_rel"] <= tol else " **over**"), v.get("tol_max_rel", "-")]
                      for n, e in v["grids"].items()], left=4)
    return out


def _md_aoti(d, m):
    out = []
    for key, label in (("dit_slice", "DiT slice"), ("dit_slice_triton", "DiT slice, flf2v Triton attention")):
        s = d.get(key) or {}
        if s.get("skipped") or s.get("error"):
            out += [f"{label}: {s.get('skipped') or s.get('error')}", ""]
        elif s:
            k = s.get("kernels_in_package")
            out += [f"{label} ({s.get('blocks')} blocks, {s.get('tokens')} tokens, {s.get('dtype')}): export "
                    f"{_f(s.get('export_s'), '{:.1f}')} s, compile {_f(s.get('compile_s'), '{:.1f}')} s, package "
                    f"{_f(s.get('package_mib'), '{:.0f}')} MiB; forward AOTI {_f(s.get('aoti_forward_s'))} s vs eager "
                    f"sdpa {_f(s.get('eager_forward_s'))} s ({_f(s.get('speedup_vs_eager'), '{:.2f}')}x), max rel err "
                    f"{_f((s.get('vs_eager') or {}).get('max_rel'), '{:.2e}')}"
                    + ("" if k is None else f"; flf2v kernels in the package: {', '.join(k) or 'none'}"), ""]
    t = d.get("tiny") or {}
    return out + [f"Tiny AOTI folder: {t.get('skipped') or t.get('error')}" if t.get("skipped") or t.get("error") else
                  f"Tiny AOTI folder (bf16): build {_f(t.get('build_s'), '{:.1f}')} s, {_f(t.get('folder_mib'), '{:.1f}')} "
                  f"MiB, first video {_f(t.get('first_run_s'), '{:.1f}')} s, {t.get('steps_captured')} steps captured, "
                  f"video vs torch bf16 max rel {_f((t.get('video_vs_torch_bf16') or {}).get('max_rel'), '{:.2e}')}",
                  *(["", _md_streamed(t["streamed"])] if "streamed" in t else [])]


def _md_streamed(s):
    if s.get("error"):
        return f"STREAM=1 (streamed blocks): {s['error']}"
    return (f"STREAM=1, no block resident: DiT build {_f(s.get('build_s'), '{:.1f}')} s, first video "
            f"{_f(s.get('first_run_s'), '{:.1f}')} s, {s.get('block_copies')} block copies, video vs the whole "
            f"packages max rel {_f((s.get('video_vs_whole') or {}).get('max_rel'), '{:.2e}')}")


def _md_pytest(d, m):
    out = [f"`{d.get('command', '')}`: exit {d.get('returncode')}; {d.get('passed', '-')} passed, "
           f"{d.get('failed', '-')} failed, {d.get('errors', '-')} errors, {d.get('skipped', '-')} skipped, "
           f"{d.get('not_run_missing_module', 0)} not run for want of a package absent here.", ""]
    out += [f"- {f['kind']}: `{f['test']}`: {f['message']}" for f in d.get("failures", [])]
    out += [f"- skipped x{n}: {reason}" for reason, n in d.get("skip_reasons", {}).items()]
    return out + [f"- not run, no module `{mod}`: {', '.join(f'`{t}`' for t in tests)}"
                  for mod, tests in d.get("missing_modules", {}).items()]


def _md_quant(d, m):
    rows = [[n, f"{r['in']} -> {r['out']}", f"{r['ref_ms']:.2f}", f"{r['fp8_ms']:.2f}", f"{r['speedup']:.2f}x",
             f"{r['rel_l2']:.4f}", f"{r['cosine']:.5f}"] for n, r in d.get("linears", {}).items()]
    out = [f"{d.get('tokens')} tokens ({d.get('shape')}), reference {d.get('dtype')}, median of the runs.", ""]
    out += table(["linear", "shape", f"{d.get('dtype')} ms", "fp8 ms", "speedup", "rel L2 vs ref", "cosine"], rows)
    a = d.get("attention") or {}
    out += ["", f"Self-attention: {a['skipped']}" if "skipped" in a else
            f"Self-attention L={a.get('tokens')}, {a.get('heads')} x {a.get('head_dim')}: exact fused "
            f"{_f(a.get('exact_ms'), '{:.1f}')} ms, sage {_f(a.get('sage_ms'), '{:.1f}')} ms "
            f"({_f(a.get('speedup'), '{:.2f}')}x), cosine {_f(a.get('cosine'), '{:.5f}')}, rel L1 "
            f"{_f(a.get('rel_l1'), '{:.4f}')}"]
    return out


def _md_offload(d, m):
    return [f"{d.get('blocks')} blocks of {d.get('model')} at {d.get('tokens')} tokens ({d.get('shape')}, "
            f"{d.get('dtype')}), all streamed from host memory ({_f(d.get('pinned_bytes', 0) / 2**30, '{:.1f}')} GiB "
            f"pinned) through two device slots: resident {_f(d.get('resident_s'), '{:.3f}')} s, streamed "
            f"{_f(d.get('streamed_s'), '{:.3f}')} s ({_f(100 * d.get('overhead', 0), '{:+.1f}')}%); one block's "
            f"copy ({_f(d.get('block_bytes', 0) / 1e9, '{:.2f}')} GB) {_f(1e3 * d.get('block_copy_s', 0), '{:.1f}')}"
            f" ms, {_f(d.get('copy_gb_s'), '{:.1f}')} GB/s; max abs vs resident {_f(d.get('max_abs'), '{:.1e}')}."]


RENDER = {"environment": _md_env, "kernels": _md_kernels, "cuda_graph": _md_graph, "dit_slice": _md_slice,
          "trt_tiny": _md_trt, "aoti": _md_aoti, "quant": _md_quant, "offload": _md_offload,
          "pytest": _md_pytest}
