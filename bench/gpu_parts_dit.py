"""Parts 5 and 4 of `make gpu-check` (bench/gpu_check.py runs them): a full-width slice of the flf2v-14B DiT
(torch eager, torch + Triton, a TensorRT engine) and tiny TensorRT DiT engines against the torch reference
through the denoising loop (static engines) and at a landscape and a portrait grid (a dynamic engine).
Box-safe at import: stdlib only (torch, tensorrt, onnxruntime and the export modules are imported inside
the parts, and only when they can run)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from flf2v.bench.gpu_common import (CheckFailed, Skip, cosine, errors, free_cuda, log, loop_inputs, model_preset,
                                    one_line, sync, timed_s, tokens_of, torch_denoiser, video_shapes)

if TYPE_CHECKING:
    from flf2v.bench.gpu_check import Run

TRT_MODULES = ("tensorrt", "polygraphy", "onnxscript", "onnx_ir", "onnx_graphsurgeon", "ftfy", "regex")


# ---- 5. full-width DiT slice ---------------------------------------------------------------------------

def build_random_dit(cfg, dtype, device, seed: int = 0):
    """WanDiT(cfg) with random weights made on `device` (no host copy of the weights): built on meta,
    moved with to_empty, filled by models.make_tiny.randomize_ with a generator on that device."""
    import torch

    from flf2v.models.dit import WanDiT
    from flf2v.models.make_tiny import randomize_
    with torch.device("meta"):
        model = WanDiT(cfg)
    model = model.to(dtype).to_empty(device=device)  # the fixed tables are real and stay fp32 (WanDiT._apply)
    with torch.device(device):
        randomize_(model, torch.Generator(device=device).manual_seed(seed))
    return model.eval().requires_grad_(False)


def _gpu_key(run: Run) -> tuple[str, str]:
    from flf2v.bench.cost import GPUS
    name = (run.results["machine"].get("gpu") or "").upper()
    for key in GPUS:
        if key in name:
            return key, f"{GPUS[key].name} floor"
    return "H100", f"{GPUS['H100'].name} floor (this GPU is not in bench/cost.py's table)"


def part_dit_slice(run: Run, data: dict, part_end: float) -> None:
    import torch

    from flf2v.bench.cost import dit_forward_flops, dit_layer_flops, floors, video_costs
    preset = model_preset(run)
    full = preset.dit
    n_blocks = 2
    slice_cfg = dataclasses.replace(full, num_layers=n_blocks)
    shape_name = video_shapes(run)[0]
    L, latent, shape = tokens_of(preset, shape_name)
    dtype = torch.float32 if run.smoke else torch.bfloat16
    reps = 1 if run.smoke else (2 if run.args.quick else 3)
    steps = preset.sample_steps
    forwards = 2 * steps  # classifier-free guidance: cond + uncond per step
    data.update(model=preset.name, blocks=n_blocks, of_blocks=full.num_layers, dim=full.dim, heads=full.num_heads,
                ffn_dim=full.ffn_dim, shape=shape_name, latent=list(latent), tokens=L, text_tokens=full.text_len,
                image_tokens=full.clip_tokens, dtype=str(dtype).removeprefix("torch."), batch=1, reps=reps,
                steps=steps, forwards_per_video=forwards, backends={})
    if run.cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_random_dit(slice_cfg, dtype, run.device)
    sync(run)
    data["build_s"] = time.perf_counter() - t0
    data["params"] = sum(p.numel() for p in model.parameters())
    data["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    x, context, clip, y = loop_inputs(slice_cfg, latent, run.device, seed=2)
    x, y, context = x[:1], y[:1], context[:1]
    t = torch.tensor([999], device=run.device)
    inputs = (x, t, context, clip, y)

    captured = {}

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    handle = model.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    layer_flops = sum(dit_layer_flops(full, L).values())
    outputs = {}
    gpu_key, floor_label = _gpu_key(run) if run.cuda else ("H100", "H100 SXM floor")
    costs = video_costs(preset, shape.width, shape.height, shape.frame_num, steps)
    floor_s = floors(costs)["denoise"][f"{gpu_key} bf16"]
    data.update(floor_s=floor_s, floor=f"{floor_label}, bf16 dense, {forwards} forwards (bench/cost.py)",
                forward_flops_full=dit_forward_flops(full, latent), block_flops=layer_flops)
    problems = []
    try:
        for kind in ("sdpa", "triton"):
            name = {"sdpa": "torch eager (SDPA)", "triton": "torch + Triton kernels"}[kind]
            left = part_end - time.monotonic()
            if not run.smoke and left < 30:
                data["backends"][name] = {"skipped": f"time budget: {left:.0f} s left of the part"}
                continue
            model.attention = kind
            with torch.no_grad():
                if run.cuda:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                out = model(*inputs)  # warm-up (the Triton kernels autotune here unless part 2 did at this L)
                sync(run)
                first = time.perf_counter() - t0
                if run.smoke:  # the Triton interpreter takes seconds a call: the first call is the timing
                    fwd, fwd_all = first, [first]
                else:
                    fwd, fwd_all = timed_s(run, lambda: model(*inputs), reps)
                args, kwargs = captured["args"], captured["kwargs"]
                blk, _ = timed_s(run, lambda: model.blocks[0](*args, **kwargs), reps)
            row = {"first_call_s": first, "forward_s": fwd, "forward_runs_s": fwd_all, "block_s": blk,
                   "block_tflops": layer_flops / blk / 1e12,
                   "outside_blocks_s": max(fwd - n_blocks * blk, 0.0)}
            row["full_forward_s"] = row["outside_blocks_s"] + full.num_layers * blk
            row["video_denoise_s"] = forwards * row["full_forward_s"]
            row["vs_floor"] = row["video_denoise_s"] / floor_s
            row["full_forward_tflops"] = dit_forward_flops(full, latent) / row["full_forward_s"] / 1e12
            if run.cuda:
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row["finite"] = bool(torch.isfinite(out).all())
            outputs[kind] = out
            data["backends"][name] = row
            log(f"dit_slice: {name}: forward ({n_blocks} blocks) {fwd * 1e3:.1f} ms, block {blk * 1e3:.1f} ms "
                f"({row['block_tflops']:.0f} TFLOP/s); {full.num_layers}-block forward ~{row['full_forward_s']:.2f} s; "
                f"{steps}-step video ~{row['video_denoise_s']:.0f} s (extrapolated) vs floor {floor_s:.0f} s")
            if not row["finite"]:
                problems.append(f"{name}: non-finite output")
            captured.clear()
    finally:
        handle.remove()
    if "sdpa" in outputs and "triton" in outputs:
        data["triton_vs_sdpa"] = errors(outputs["triton"], outputs["sdpa"])
        tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
        data["triton_vs_sdpa"]["tol"] = tol
        if not data["triton_vs_sdpa"]["max_rel"] <= tol:
            problems.append(f"Triton vs SDPA slice output: max rel {data['triton_vs_sdpa']['max_rel']:.3g} > {tol:g}")
    outputs.clear()
    data["backends"]["TensorRT engine (bf16)"] = _trt_slice(run, model, slice_cfg, preset, shape, inputs, part_end)
    trt_row = data["backends"]["TensorRT engine (bf16)"]
    if "error" in trt_row:
        problems.append(f"TensorRT slice: {trt_row['error']}")
    elif "forward_s" in trt_row:
        blk = data["backends"].get("torch eager (SDPA)", {}).get("block_s")
        outside = data["backends"].get("torch eager (SDPA)", {}).get("outside_blocks_s", 0.0)
        per_block = max(trt_row["forward_s"] - outside, 0.0) / n_blocks if blk else trt_row["forward_s"] / n_blocks
        trt_row["full_forward_s"] = outside + full.num_layers * per_block
        trt_row["video_denoise_s"] = forwards * trt_row["full_forward_s"]
        trt_row["vs_floor"] = trt_row["video_denoise_s"] / floor_s
    data["note"] = (f"full forward = (slice forward - {n_blocks} x block) + {full.num_layers} x block; "
                    f"video = {forwards} forwards (B=1 each; the runtime batches cond+uncond)")
    if problems:
        raise CheckFailed("; ".join(problems))


def _trt_slice(run: Run, model, slice_cfg, preset, shape, inputs, part_end: float) -> dict:
    """The slice as a bf16 TensorRT engine: checkpoint -> export (streamed) -> build -> time one forward."""
    if not run.cuda:
        return {"skipped": "no CUDA"}
    missing = [m for m in TRT_MODULES if importlib.util.find_spec(m) is None and m not in ("ftfy", "regex")]
    if missing:
        return {"skipped": f"no {', '.join(missing)} on this python"}
    left = part_end - time.monotonic()
    if left < 240:
        return {"skipped": f"time budget: {left:.0f} s left of the part; a 2-block engine at {shape.name} needs an "
                           f"export of {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters and a "
                           f"TensorRT build of minutes (measure it with flf2v-bench --preset 720p)"}
    import torch

    from flf2v.export import contracts as C
    from flf2v.export.onnx_export import export_graph
    try:
        from flf2v.export.trt_engine import build_trt_engine
    except ImportError:  # before export/trt_engine.py split it off
        from flf2v.export.build import build_trt_engine
    from flf2v.models.make_tiny import write_dit
    row = {}
    try:
        with tempfile.TemporaryDirectory(prefix="flf2v-gpu-check-trt-slice-") as tmp:
            tmp = Path(tmp)
            sp = dataclasses.replace(preset, dit=slice_cfg)
            t0 = time.perf_counter()
            write_dit(tmp, model, slice_cfg.to_json_dict())
            graph = C.get_graph(sp, shape, "bf16", "dit_b1")
            onnx_path = export_graph(graph, tmp, tmp / "dit_b1.onnx", preset=sp)
            row["export_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            build_trt_engine(onnx_path, tmp / "dit_b1.engine", graph, 3, tmp / "timing.cache")
            row["build_s"] = time.perf_counter() - t0
            runner = EngineRunner("trt", tmp / "dit_b1.engine", [s.to_json() for s in graph.inputs],
                                  [s.to_json() for s in graph.outputs], run.device)
            with torch.no_grad():
                out = runner(list(inputs))[0].clone()
                row["forward_s"], _ = timed_s(run, lambda: runner(list(inputs)), 3)
                model.attention = "sdpa"
                row["vs_torch_sdpa"] = errors(out, model(*inputs))
    except Exception as e:  # noqa: BLE001 - one row of the part
        row["error"] = one_line(e)
    return row


# ---- 4. tiny engines vs torch --------------------------------------------------------------------------

class EngineRunner:
    """One engine file: TensorRT (as runtime.trt_backend.TrtBackend binds it) or, for the CPU smoke test, an ONNX
    Runtime session. __call__(inputs, dims, profile) -> outputs; TensorRT reuses its buffers. A dynamic
    engine (manifest dims such as "2*hp") runs at the root dims `dims` ({"T": 3, "hp": 3, "wp": 5}) in the
    optimization profile `profile` that holds them; ONNX Runtime takes any shape and ignores both."""

    def __init__(self, kind: str, path: Path, inputs: list[dict], outputs: list[dict], device):
        import torch
        self.kind, self.inputs, self.outputs, self.device = kind, inputs, outputs, torch.device(device)
        self.dynamic = any(isinstance(d, str) for s in inputs for d in s["shape"])
        self.bound = None  # (dims, profile) the context and buffers are set to
        if kind == "trt":
            import tensorrt as trt
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT could not deserialize {path}")
            self.ctx = self.engine.create_execution_context()
            if not self.dynamic:
                self._bind({}, 0)
        else:
            import onnxruntime as ort
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def _bind(self, dims: dict, profile: int) -> None:
        """TensorRT: the context set to this grid (profile first, then every input shape, as TrtBackend._load)
        and bound to fresh buffers of its shapes; kept while the grid stays. Unverified on a GPU (written
        against the TensorRT 10.x / 11.x Python API; the CPU smoke test runs ONNX Runtime instead)."""
        import torch

        from flf2v.export.contracts import TORCH_DTYPES, dim_value
        key = (tuple(sorted(dims.items())), profile)
        if key == self.bound:
            return
        self.bufs = {}  # the previous grid's buffers go before this grid's are allocated
        if self.dynamic and self.engine.num_optimization_profiles > 1:
            stream = torch.cuda.current_stream(self.device).cuda_stream  # the stream __call__ enqueues on
            if not self.ctx.set_optimization_profile_async(profile, stream):
                raise RuntimeError(f"TensorRT refused optimization profile {profile}")
        for is_input, specs in ((True, self.inputs), (False, self.outputs)):
            for s in specs:
                shape = [dim_value(d, dims) for d in s["shape"]]
                if is_input and self.dynamic and not self.ctx.set_input_shape(s["name"], shape):
                    raise RuntimeError(f"TensorRT refused input {s['name']} of shape {shape} in profile {profile}")
                t = self.bufs[s["name"]] = torch.empty(shape, dtype=TORCH_DTYPES[s["dtype"]], device=self.device)
                if not self.ctx.set_tensor_address(s["name"], t.data_ptr()):
                    raise RuntimeError(f"TensorRT refused the address of {s['name']} {shape}")
        self.bound = key

    def __call__(self, xs, dims: dict | None = None, profile: int = 0):
        import torch
        if self.kind == "trt":
            if self.dynamic and dims is None:
                raise ValueError("a dynamic engine runs at given dims (T, hp, wp)")
            self._bind(dims or {}, profile)
            for s, x in zip(self.inputs, xs):
                self.bufs[s["name"]].copy_(x)
            if not self.ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
                raise RuntimeError("TensorRT failed to enqueue")
            return [self.bufs[s["name"]] for s in self.outputs]
        feeds = {s["name"]: x.detach().cpu().contiguous().numpy() for s, x in zip(self.inputs, xs)}
        return [torch.from_numpy(o).to(self.device) for o in self.session.run(None, feeds)]


# per-graph max rel error and minimum per-step latent cosine, engine vs torch of the same precision
ENGINE_TOL = {"fp32": (1e-3, 0.9999), "bf16": (5e-2, 0.99)}
# The dynamic variant's videos (frames, height, width): one per optimization profile of the tiny `dynamic`
# folder, latent grids (T, h, w) (3, 6, 10) landscape and (2, 10, 6) portrait, neither a profile's opt.
DYNAMIC_VIDEOS = {"landscape": (9, 48, 80), "portrait": (5, 80, 48)}


def part_trt_tiny(run: Run, data: dict, part_end: float) -> None:
    import torch
    if run.cuda:
        missing = [m for m in TRT_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise Skip(f"no {', '.join(missing)} on this python: TensorRT engines cannot be built here")
        backend, graphs = "trt", ["dit_b1", "dit_b2"]
        # the dynamic variant before the plugins: a dynamic onnx-attention folder is the default build
        variants = [(p, "onnx", "tiny") for p in ("fp32", "bf16")] + [("bf16", "onnx", "dynamic")]
        variants += [(p, "plugin", "tiny") for p in ("fp32", "bf16")] + [("bf16", "plugin", "tiny-largest-tactic")]
    else:
        missing = [m for m in ("onnxruntime", "onnxscript", "onnx_ir", "onnx_graphsurgeon", "ftfy", "regex")
                   if importlib.util.find_spec(m) is None]
        if missing:
            raise Skip(f"smoke stand-in (ONNX Runtime) needs {', '.join(missing)}")
        backend, graphs = "ort", ["dit_b2"]
        variants = [("fp32", "onnx", "tiny"), ("fp32", "onnx", "dynamic")]
        data["note"] = "smoke: ONNX Runtime fp32 engines stand in for TensorRT (no CUDA)"
    from flf2v.export import contracts as C
    from flf2v.export.build import build
    from flf2v.models import checkpoint as ck
    from flf2v.models.make_tiny import write_tiny_checkpoint
    from flf2v.runtime.denoise import DenoiseLoop
    from flf2v.runtime.scheduler import make_sampler
    steps = 4 if run.smoke else 8
    data.update(backend=backend, graphs=graphs, steps=steps, variants=[])
    problems = []
    with tempfile.TemporaryDirectory(prefix="flf2v-gpu-check-engines-") as tmp:
        tmp = Path(tmp)
        ckpt = write_tiny_checkpoint(tmp / "ckpt", "tiny", seed=0)
        preset = ck.preset_for(ckpt)
        shape = C.get_shape(preset, "tiny")  # static: the runners bind the manifest's shapes
        latent = shape.latent(preset)
        refs = {}
        x0, context, clip, y = loop_inputs(preset.dit, latent, run.device, seed=3)

        def reference(precision):
            if precision not in refs:
                dit = ck.load_dit(ckpt, C.COMPUTE_DTYPE[precision], preset).to(run.device)
                refs[precision] = dit
            return refs[precision]

        def run_loop(denoise_fns, cfg_batch):
            """Loops stepped side by side; x after every step, per loop."""
            loops = [DenoiseLoop(fn, make_sampler("unipc", steps, preset.sample_shift), x0, context, clip, y,
                                 preset.sample_guide_scale, cfg_batch) for fn in denoise_fns]
            xs = [[] for _ in loops]
            with torch.no_grad():
                for i in range(steps):
                    for loop, out in zip(loops, xs):
                        loop._load(i)
                        loop.step()
                        out.append(loop.x.clone())
            return xs

        def static_variant(v: dict, precision: str, attention: str, folder: Path) -> str | None:
            """Static engines per graph, then through the denoising loop; the problem, if any."""
            t0 = time.perf_counter()
            folder = build(ckpt, shape.name, precision, out=folder, backend=backend,
                           cfg_batch=tuple(int(g[-1]) for g in graphs), only=graphs, progress=False,
                           attention=attention)
            v["build_s"] = time.perf_counter() - t0
            manifest = json.loads((folder / "manifest.json").read_text())
            runners = {g: EngineRunner(backend, folder / manifest["engines"][g]["file"],
                                       manifest["engines"][g]["inputs"], manifest["engines"][g]["outputs"],
                                       run.device) for g in graphs}
            ref = reference(precision)
            v["graphs"] = {}
            for g in graphs:
                spec = C.get_graph(preset, shape, precision, g)
                feed = [t.to(run.device) for t in C.sample_inputs(spec, seed=1)]
                with torch.no_grad():
                    want = C.module(spec, {"dit": ref})(*feed)[0]
                    got = runners[g](feed)[0]
                v["graphs"][g] = errors(got, want)
            tol_graph, tol_cos = ENGINE_TOL[precision]
            # as the runtime's engine backends: the output buffer is the engine's own, reused by its next call
            engine_fn = (lambda x, t, c, cl, yy: runners[f"dit_b{x.shape[0]}"]([x, t, c, cl, yy])[0])
            fns = [torch_denoiser(ref, C.COMPUTE_DTYPE[precision], run.device), engine_fn]
            if precision != "fp32":
                fns.append(torch_denoiser(reference("fp32"), torch.float32, run.device))
            v["loops"] = {}
            for g in graphs:
                cfg_batch = int(g[-1])
                xs = run_loop(fns, cfg_batch)
                entry = {"cosine_per_step": [cosine(e, r) for e, r in zip(xs[1], xs[0])]}
                if precision != "fp32":
                    entry["cosine_per_step_vs_fp32_torch"] = [cosine(e, r) for e, r in zip(xs[1], xs[2])]
                entry["min_cosine"] = min(entry["cosine_per_step"])
                entry["final"] = errors(xs[1][-1], xs[0][-1])
                v["loops"][f"cfg_batch={cfg_batch}"] = entry
            worst_graph = max(e["max_rel"] for e in v["graphs"].values())
            worst_cos = min(e["min_cosine"] for e in v["loops"].values())
            v.update(max_rel=worst_graph, min_cosine=worst_cos, tol_max_rel=tol_graph, tol_min_cosine=tol_cos)
            log(f"trt_tiny: {backend} {precision} attention={attention}: build {v['build_s']:.1f} s, max rel "
                f"{worst_graph:.2e}, min per-step cosine {worst_cos:.6f}")
            if not (worst_graph <= tol_graph and worst_cos >= tol_cos):
                return (f"max rel {worst_graph:.3g} (tol {tol_graph:g}), "
                        f"min cosine {worst_cos:.6f} (tol {tol_cos})")
            return None

        for precision, attention, shape_name in variants:
            v = {"precision": precision, "attention": attention, "shape": shape_name}
            data["variants"].append(v)
            label = f"{precision}/{attention}" + ("/dynamic" if shape_name == "dynamic" else "")
            left = part_end - time.monotonic()
            need = 40 if shape_name == "dynamic" else 25  # a dynamic TensorRT build tunes two profiles
            if not run.smoke and left < need:
                v["skipped"] = f"time budget: {left:.0f} s left of the part"
                continue
            try:
                if attention == "plugin":
                    from flf2v.kernels.trt_plugin import register_plugins
                    register_plugins()
                folder = tmp / f"{backend}-{precision}-{attention}-{shape_name}"
                if shape_name == "dynamic":
                    problem = _dynamic_variant(run, v, ckpt, preset, backend, folder, reference(precision))
                elif shape_name.endswith("largest-tactic"):  # the launch at the most shared memory
                    os.environ["FLF2V_PLUGIN_TACTICS"] = "largest"
                    try:
                        problem = static_variant(v, precision, attention, folder)
                    finally:
                        os.environ.pop("FLF2V_PLUGIN_TACTICS", None)
                else:
                    problem = static_variant(v, precision, attention, folder)
                if problem:
                    problems.append(f"{label}: {problem}")
            except Exception as e:  # noqa: BLE001 - one variant fails, the others still run
                v["error"] = one_line(e)
                v["traceback"] = traceback.format_exc(limit=6)[-2000:]
                problems.append(f"{label}: {v['error']}")
            free_cuda(run)
        refs.clear()
    if problems:
        raise CheckFailed("; ".join(problems))


def _dynamic_variant(run: Run, v: dict, ckpt, preset, backend: str, folder: Path, ref) -> str | None:
    """The tiny `dynamic` folder's dit_b2 at one grid per optimization profile (DYNAMIC_VIDEOS), one engine
    and context switched between them as the runtime's TrtBackend does, against the torch reference DiT at
    the same inputs; the problem, if any. No denoising loop: the static variants cover it."""
    import torch

    from flf2v.export import contracts as C
    from flf2v.export.build import build
    shape = C.get_shape(preset, "dynamic")
    t0 = time.perf_counter()
    folder = build(ckpt, shape.name, v["precision"], out=folder, backend=backend, cfg_batch=(2,), only=["dit_b2"],
                   progress=False, attention=v["attention"])
    v["build_s"] = time.perf_counter() - t0
    spec = json.loads((folder / "manifest.json").read_text())["engines"]["dit_b2"]
    runner = EngineRunner(backend, folder / spec["file"], spec["inputs"], spec["outputs"], run.device)
    graph = C.get_graph(preset, shape, v["precision"], "dit_b2")
    v["grids"] = {}
    for name, video in DYNAMIC_VIDEOS.items():
        dims = dict(zip(C.DIMS, shape.dims(preset, *video)))
        profile = shape.profile_of(preset, *video)  # as the runtime picks it for this video
        if profile is None:
            raise ValueError(f"{name} video {video} is in no profile of {shape.name}")
        g = graph.at(dims)
        feed = [t.to(run.device) for t in C.sample_inputs(g, seed=1)]
        with torch.no_grad():
            want = C.module(g, {"dit": ref})(*feed)[0]
            got = runner(feed, dims, profile)[0]
        v["grids"][name] = {"video": list(video), "latent": list(feed[0].shape[2:]), "dims": dims,
                            "profile": profile, **errors(got, want)}
    tol = ENGINE_TOL[v["precision"]][0]
    v.update(max_rel=max(e["max_rel"] for e in v["grids"].values()), tol_max_rel=tol)
    log(f"trt_tiny: {backend} {v['precision']} attention={v['attention']} dynamic: build {v['build_s']:.1f} s, "
        + ", ".join(f"{n} (profile {e['profile']}) max rel {e['max_rel']:.2e}" for n, e in v["grids"].items()))
    over = [f"{n} {e['max_rel']:.3g}" for n, e in v["grids"].items() if not e["max_rel"] <= tol]  # NaN too
    return f"max rel {', '.join(over)} (tol {tol:g})" if over else None
