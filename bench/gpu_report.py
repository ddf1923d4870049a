"""The Markdown report of `make gpu-check` (bench/gpu_check.py): render_md(results) -> text, one table per
part from the results JSON. Box-safe at import: stdlib only."""
from __future__ import annotations

import math

from flf2v.bench.gpu_common import one_line


def _f(x, fmt="{:.3g}", none="-"):
    if x is None:
        return none
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return fmt.format(x)


def render_md(res: dict) -> str:
    m = res.get("machine", {})
    gpu = m.get("gpu") or "no GPU (CPU smoke run)"
    lines = [f"# gpu-check: {gpu}, {res['started'][:10]}", ""]
    if res["mode"] == "gpu":
        lines.append(f"All figures below come from this one run of `python -m flf2v.bench.gpu_check` on this GPU "
                     f"({gpu}, sm {m.get('capability')}, {m.get('memory_gib')} GiB, driver {m.get('driver')}, CUDA "
                     f"{m.get('cuda_runtime')}; torch {m.get('torch')}, triton {m.get('triton')}, Python "
                     f"{m.get('python')}), with random weights; nothing is copied from elsewhere. Values marked "
                     f"*extrapolated* are computed from measured ones as stated.")
    else:
        lines.append(f"**{res['mode']}**: a test of this tool's code on a CPU, not a measurement.")
    lines += ["", f"Commit {m.get('git_commit')}{' (dirty)' if m.get('git_dirty') else ''}; "
                  f"budget {res['budget_s']:.0f} s; total {_f(res.get('seconds'), '{:.0f}')} s; "
                  f"exit code {res.get('exit_code')}"
                  f"{'; --quick' if res.get('quick') else ''}.", "",
              "| part | status | seconds | planned | note |", "|---|---|---:|---:|---|"]
    order = sorted(res["parts"].items(), key=lambda kv: kv[1]["number"])
    for key, p in order:
        note = p.get("error") or p.get("reason") or p.get("note") or ""
        lines.append(f"| {p['number']}. {p['title']} | {p['status']} | {_f(p.get('seconds'), '{:.1f}')} | "
                     f"{p.get('planned_s', '-')} | {note.replace('|', '/')} |")
    for key, p in order:
        d = p.get("data") or {}
        lines += ["", f"## {p['number']}. {p['title']}: {p['status']}", ""]
        if p.get("error"):
            lines += [f"Error: {p['error']}", ""]
        if p.get("reason"):
            lines += [f"Skipped: {p['reason']}", ""]
        if p.get("traceback"):
            lines += ["```", p["traceback"].rstrip(), "```", ""]
        renderer = {"environment": _md_env, "kernels": _md_kernels, "cuda_graph": _md_graph,
                    "dit_slice": _md_slice, "trt_tiny": _md_trt, "aoti": _md_aoti, "pytest": _md_pytest}[key]
        if d:
            try:
                lines += renderer(d, m)
            except Exception as e:  # noqa: BLE001 - a rendering bug must not lose the JSON
                lines.append(f"(could not render this part: {one_line(e)}; see the JSON)")
    return "\n".join(lines) + "\n"


def _md_env(d, m):
    rows = ["| item | value |", "|---|---|"]
    for k in ("gpu", "capability", "memory_gib", "multiprocessors", "driver", "cuda_runtime", "cudnn", "torch",
              "triton", "triton_knobs", "c_compiler", "python", "platform", "flf2v", "TRITON_INTERPRET"):
        if k in m:
            rows.append(f"| {k} | {m[k]} |")
    pk = d.get("packages", {})
    rows.append(f"| packages present | {', '.join(f'{k} {v}' for k, v in pk.items() if v)} |")
    rows.append(f"| packages missing | {', '.join(d.get('missing', [])) or '-'} |")
    for k in ("warning", "triton_error"):
        if d.get(k):
            rows.append(f"| **{k}** | {d[k]} |")
    for mod, err in d.get("project_imports_failing", {}).items():
        rows.append(f"| `flf2v.{mod}` does not import | {err.replace('|', '/')} |")
    return rows


def _md_kernels(d, m):
    out = [f"B = 1, {d['heads']} heads x {d['head_dim']} (dim {d['dim']}), {d['dtype']}; cross-attention keys: "
           f"{d['text_tokens']} text + {d['image_tokens']} image. Times: medians of triton.testing.do_bench; "
           f"errors: max |a - b| / max |b| against the PyTorch reference and against fp64 on 256 sampled query "
           f"rows (tolerance for the Triton rows: {d.get('tolerance_vs_fp64')}). `first call` includes autotuning.", ""]
    for name, e in d.get("shapes", {}).items():
        out += [f"### {name}: {e['tokens']:,} tokens (latent {e['latent']})", "",
                "| kernel | ms | TFLOP/s | rel err vs reference | rel err vs fp64 rows | first call s |",
                "|---|---:|---:|---:|---:|---:|"]
        for kind in ("self", "cross"):
            for r in e.get(kind, {}).get("rows", []):
                label = f"{kind}: {r['name']}"
                if "skipped" in r:
                    out.append(f"| {label} | skipped: {r['skipped']} | | | | |")
                elif "tbps" in r:
                    out.append(f"| {label} | {_f(r['ms'], '{:.3f}')} | {_f(r['tbps'], '{:.2f}')} TB/s | | | |")
                else:
                    out.append(f"| {label} | {_f(r['ms'], '{:.3f}')} | {_f(r['tflops'], '{:.1f}')} | "
                               f"{_f(r.get('vs_reference', {}).get('max_rel'), '{:.2e}')} | "
                               f"{_f(r.get('vs_fp64_rows', {}).get('max_rel'), '{:.2e}')} | "
                               f"{_f(r.get('first_call_s'), '{:.1f}')} |")
        out.append("")
    return out


def _md_graph(d, m):
    out = [f"Tiny DiT, latent {d['latent']}, {d['steps']} {d['solver']} steps, guide {d['guide_scale']}; "
           f"{'CUDA graph captured with DenoiseLoop.capture()' if d.get('captured') else d.get('note', '')}.", "",
           "| dtype | attention | cfg_batch | eager ms/step | graph ms/step | speed-up | max abs diff | max rel diff "
           "| tol |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in d.get("cases", []):
        out.append(f"| {c['dtype']} | {c.get('attention', 'sdpa')} | {c['cfg_batch']} | "
                   f"{_f(c.get('eager_step_ms'), '{:.3f}')} | "
                   f"{_f(c.get('graph_step_ms'), '{:.3f}')} | {_f(c.get('speedup'), '{:.1f}')}x | "
                   f"{_f(c.get('max_abs'), '{:.2e}')} | {_f(c.get('max_rel'), '{:.2e}')} | "
                   f"{_f(c.get('tol'), '{:g}')} |")
    return out


def _md_slice(d, m):
    out = [f"{d['blocks']} of the {d['of_blocks']} blocks of {d['model']} (dim {d['dim']}, {d['heads']} heads, FFN "
           f"{d['ffn_dim']}), random {d['dtype']} weights ({_f(d.get('params'), '{:,}')} parameters, "
           f"{_f(d.get('weights_gib'), '{:.2f}')} GiB), {d['shape']}: {d['tokens']:,} video tokens + "
           f"{d['text_tokens']} text + {d['image_tokens']} image, B = {d['batch']}, median of {d['reps']} runs.", "",
           f"*Extrapolated*: {d.get('note', '')}; floor: {_f(d.get('floor_s'), '{:.0f}')} s ({d.get('floor')}).", "",
           "| backend | slice forward s | block s | block TFLOP/s | outside blocks s | full forward s (extrap.) | "
           f"{d['steps']}-step video s (extrap.) | x floor | peak GiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in d.get("backends", {}).items():
        if "skipped" in r or "error" in r:
            out.append(f"| {name} | {'skipped: ' + r['skipped'] if 'skipped' in r else 'error: ' + r['error']} "
                       f"| | | | | | | |")
            continue
        out.append(f"| {name} | {_f(r.get('forward_s'), '{:.3f}')} | {_f(r.get('block_s'), '{:.3f}')} | "
                   f"{_f(r.get('block_tflops'), '{:.0f}')} | {_f(r.get('outside_blocks_s'), '{:.3f}')} | "
                   f"{_f(r.get('full_forward_s'), '{:.2f}')} | {_f(r.get('video_denoise_s'), '{:.0f}')} | "
                   f"{_f(r.get('vs_floor'), '{:.2f}')} | {_f(r.get('peak_gib'), '{:.1f}')} |")
    if "triton_vs_sdpa" in d:
        e = d["triton_vs_sdpa"]
        out += ["", f"Slice output, Triton vs SDPA: max abs {e['max_abs']:.2e}, max rel {e['max_rel']:.2e} "
                    f"(tol {e['tol']:g})."]
    return out


def _md_trt(d, m):
    out = [f"Backend {d.get('backend')}, graphs {', '.join(d.get('graphs', []))}, {d.get('steps')} denoising steps. "
           f"{d.get('note', '')}", "",
           "| precision | attention | shape | build s | max rel err per graph | min per-step cosine | tol (rel, cos) "
           "| note |",
           "|---|---|---|---:|---|---:|---|---|"]
    for v in d.get("variants", []):
        graphs = ", ".join(f"{g} {e['max_rel']:.2e}" for g, e in v.get("graphs", {}).items())
        graphs = graphs or ", ".join(f"dit_b2 {n} {e['max_rel']:.2e}" for n, e in v.get("grids", {}).items())
        note = v.get("skipped") or v.get("error") or ""
        out.append(f"| {v['precision']} | {v['attention']} | {v.get('shape', '-')} | {_f(v.get('build_s'), '{:.1f}')} "
                   f"| {graphs or '-'} | {_f(v.get('min_cosine'), '{:.6f}')} | {v.get('tol_max_rel', '-')}, "
                   f"{v.get('tol_min_cosine', '-')} | {note.replace('|', '/')} |")
    for v in d.get("variants", []):
        if v.get("grids"):
            out += _md_grids(v)
    return out


def _md_aoti_slice(s, label):
    if s.get("skipped") or s.get("error"):
        return [f"{label}: {s.get('skipped') or s.get('error')}", ""]
    err = (s.get("vs_eager") or {}).get("max_rel")
    kernels = s.get("kernels_in_package")
    return [f"{label} ({s.get('blocks')} blocks, {s.get('tokens')} tokens, {s.get('dtype')}): export "
            f"{_f(s.get('export_s'), '{:.1f}')} s, compile {_f(s.get('compile_s'), '{:.1f}')} s, package "
            f"{_f(s.get('package_mib'), '{:.0f}')} MiB; forward AOTI {_f(s.get('aoti_forward_s'))} s vs eager sdpa "
            f"{_f(s.get('eager_forward_s'))} s ({_f(s.get('speedup_vs_eager'), '{:.2f}')}x), max rel err "
            f"{_f(err, '{:.2e}')}" + ("" if kernels is None else f"; flf2v kernels in the package: "
                                     f"{', '.join(kernels) or 'none'}"), ""]


def _md_aoti(d, m):
    t = d.get("tiny") or {}
    out = _md_aoti_slice(d.get("dit_slice") or {}, "DiT slice")
    if d.get("dit_slice_triton"):
        out += _md_aoti_slice(d["dit_slice_triton"], "DiT slice, flf2v Triton attention")
    if t.get("skipped") or t.get("error"):
        out.append(f"Tiny AOTI folder: {t.get('skipped') or t.get('error')}")
    else:
        e = (t.get("video_vs_torch_bf16") or {}).get("max_rel")
        out.append(f"Tiny AOTI folder (bf16): build {_f(t.get('build_s'), '{:.1f}')} s, "
                   f"{_f(t.get('folder_mib'), '{:.1f}')} MiB, first video {_f(t.get('first_run_s'), '{:.1f}')} s, "
                   f"video vs torch bf16 max rel {_f(e, '{:.2e}')}")
    return out


def _md_grids(v):
    """A dynamic variant: one engine run at each grid in the optimization profile the runtime would pick."""
    out = ["", f"Dynamic engine ({v['precision']}, attention {v['attention']}): dit_b2 vs the torch reference DiT "
               f"at the same inputs, one grid per optimization profile (no denoising loop).", "",
           "| grid | video (frames, H, W) | latent (T, h, w) | dims (T, hp, wp) | profile | max abs err | "
           "max rel err | tol |",
           "|---|---|---|---|---:|---:|---:|---:|"]
    for name, e in v["grids"].items():
        ok = e["max_rel"] <= v.get("tol_max_rel", math.inf)
        out.append(f"| {name} | {' x '.join(map(str, e['video']))} | {' x '.join(map(str, e['latent']))} | "
                   f"{' x '.join(str(x) for x in e['dims'].values())} | {e['profile']} | {e['max_abs']:.2e} | "
                   f"{e['max_rel']:.2e}{'' if ok else ' **over**'} | {v.get('tol_max_rel', '-')} |")
    return out


def _md_pytest(d, m):
    out = [f"`{d.get('command', '')}`: exit {d.get('returncode')}; {d.get('passed', '-')} passed, "
           f"{d.get('failed', '-')} failed, {d.get('errors', '-')} errors, {d.get('skipped', '-')} skipped, "
           f"{d.get('not_run_missing_module', 0)} not run for want of a package absent here.", ""]
    for f in d.get("failures", []):
        out.append(f"- {f['kind']}: `{f['test']}`: {f['message']}")
    for reason, n in d.get("skip_reasons", {}).items():
        out.append(f"- skipped x{n}: {reason}")
    for module, tests in d.get("missing_modules", {}).items():
        out.append(f"- not run, no module `{module}`: {', '.join(f'`{t}`' for t in tests)}")
    return out
