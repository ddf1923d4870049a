"""Parts 5 and 4 of `make gpu-check`: a full-width slice of the flf2v-14B DiT (torch eager, torch + Triton, a
TensorRT engine) and tiny TensorRT DiT engines against the torch reference through the denoising loop (static
engines) and at a landscape and a portrait grid (a dynamic engine). Box-safe at import: stdlib only."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

from flf2v.bench.gpu_common import (Skip, build_random_dit, check, cosine, errors, free_cuda, guarded, log,
                                    loop_inputs, model_preset, short_of, slice_inputs, sync, timed_s, tokens_of,
                                    torch_denoiser, video_shapes)

TRT_MODULES = ("tensorrt", "polygraphy", "onnxscript", "onnx_ir", "onnx_graphsurgeon", "ftfy", "regex")
SLICE_BACKENDS = {"sdpa": "torch eager (SDPA)", "triton": "torch + Triton kernels"}
TRT_ROW = "TensorRT engine (bf16)"


# ---- 5. full-width DiT slice ---------------------------------------------------------------------------

def _floor(run, preset, shape, steps: int) -> tuple[float, str]:
    from flf2v.bench.cost import GPUS, floors, video_costs
    name = (run.results["machine"].get("gpu") or "").upper() if run.cuda else ""
    key = next((k for k in GPUS if k in name), None)
    label = f"{GPUS[key or 'H100'].name} floor" + ("" if key or not run.cuda else
                                                   " (this GPU is not in bench/cost.py's table)")
    costs = video_costs(preset, shape.width, shape.height, shape.frame_num, steps)
    return floors(costs)["denoise"][f"{key or 'H100'} bf16"], label


def _time_slice(run, model, inputs, reps: int):
    """One backend's slice forward: the first call (autotuning), the forward's and block 0's times (its inputs
    caught by a hook), peak memory; (row, output)."""
    import torch
    caught = {}
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a, kw: caught.update(a=a, kw=kw), with_kwargs=True)
    try:
        with torch.no_grad():
            if run.cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = model(*inputs)  # warm-up (the Triton kernels autotune here unless part 2 did at this L)
            sync(run)
            first = time.perf_counter() - t0
            # the Triton interpreter takes seconds a call: in the smoke the first call is the timing
            fwd, fwd_all = (first, [first]) if run.smoke else timed_s(run, lambda: model(*inputs), reps)
            blk, _ = timed_s(run, lambda: model.blocks[0](*caught["a"], **caught["kw"]), reps)
    finally:
        hook.remove()
    row = {"first_call_s": first, "forward_s": fwd, "forward_runs_s": fwd_all, "block_s": blk}
    if run.cuda:
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row | {"finite": bool(torch.isfinite(out).all())}, out


def _extrapolate(row: dict, outside: float, per_block: float, d: dict) -> None:
    row["full_forward_s"] = outside + d["of_blocks"] * per_block
    row["video_denoise_s"] = d["forwards_per_video"] * row["full_forward_s"]
    row["vs_floor"] = row["video_denoise_s"] / d["floor_s"]


def part_dit_slice(run, data: dict, part_end: float) -> None:
    import torch

    from flf2v.bench.cost import dit_forward_flops, dit_layer_flops
    preset, n = model_preset(run), 2
    full = preset.dit
    slice_cfg = dataclasses.replace(full, num_layers=n)
    shape_name = video_shapes(run)[0]
    L, latent, shape = tokens_of(preset, shape_name)
    dtype = torch.float32 if run.smoke else torch.bfloat16
    floor_s, floor_label = _floor(run, preset, shape, preset.sample_steps)
    forwards = 2 * preset.sample_steps  # classifier-free guidance: cond + uncond per step
    data.update(model=preset.name, blocks=n, of_blocks=full.num_layers, dim=full.dim, heads=full.num_heads,
                ffn_dim=full.ffn_dim, shape=shape_name, latent=list(latent), tokens=L, text_tokens=full.text_len,
                image_tokens=full.clip_tokens, dtype=str(dtype)[6:], batch=1, steps=preset.sample_steps,
                reps=1 if run.smoke else (2 if run.args.quick else 3), forwards_per_video=forwards, backends={},
                floor_s=floor_s, floor=f"{floor_label}, bf16 dense, {forwards} forwards (bench/cost.py)",
                forward_flops_full=dit_forward_flops(full, latent), block_flops=sum(dit_layer_flops(full, L).values()),
                note=f"full forward = (slice forward - {n} x block) + {full.num_layers} x block; video = {forwards} "
                     f"forwards (B=1 each; the runtime batches cond+uncond)")
    t0 = time.perf_counter()
    model = build_random_dit(slice_cfg, dtype, run.device)
    sync(run)
    data.update(build_s=time.perf_counter() - t0, params=sum(p.numel() for p in model.parameters()),
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
        problems += [] if row["finite"] else [f"{name}: non-finite output"]
    if len(outputs) == 2:
        e = data["triton_vs_sdpa"] = errors(outputs["triton"], outputs["sdpa"]) | {
            "tol": 5e-2 if dtype == torch.bfloat16 else 1e-4}
        problems += [] if e["max_rel"] <= e["tol"] else [f"Triton vs SDPA slice output: max rel {e['max_rel']:.3g} "
                                                         f"> {e['tol']:g}"]
    outputs.clear()
    trt = data["backends"][TRT_ROW] = _trt_slice(run, model, slice_cfg, preset, shape, inputs, part_end)
    if "error" in trt:
        problems.append(f"TensorRT slice: {trt['error']}")
    elif "forward_s" in trt:
        sdpa = data["backends"].get(SLICE_BACKENDS["sdpa"], {})
        outside = sdpa.get("outside_blocks_s", 0.0)
        _extrapolate(trt, outside, (max(trt["forward_s"] - outside, 0.0) if sdpa.get("block_s") else trt["forward_s"])
                     / n, data)
    check(problems)


def _trt_slice(run, model, slice_cfg, preset, shape, inputs, part_end: float) -> dict:
    """The slice as a bf16 TensorRT engine: checkpoint -> export (streamed) -> build -> time one forward."""
    if not run.cuda:
        return {"skipped": "no CUDA"}
    missing = [m for m in TRT_MODULES[:5] if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"no {', '.join(missing)} on this python"}
    if reason := short_of(run, part_end, 240):
        return {"skipped": f"{reason}; a 2-block engine at {shape.name} needs an export of "
                           f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters and a TensorRT "
                           f"build of minutes (measure it with flf2v-bench --preset 720p)"}

    def measure(row):
        import torch

        from flf2v.export import contracts as C
        from flf2v.export.onnx_export import export_graph
        from flf2v.export.trt_engine import build_trt_engine
        from flf2v.models.make_tiny import write_dit
        with tempfile.TemporaryDirectory(prefix="flf2v-gpu-check-trt-slice-") as tmp:
            tmp, sp = Path(tmp), dataclasses.replace(preset, dit=slice_cfg)
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
    return guarded(measure, {})


# ---- 4. tiny engines vs torch --------------------------------------------------------------------------

class EngineRunner:
    """One engine file: TensorRT (as runtime.trt_backend.TrtBackend binds it) or, for the CPU smoke test, an
    ONNX Runtime session. __call__(inputs, dims, profile) -> outputs; TensorRT reuses its buffers. A dynamic
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

    @classmethod
    def of(cls, kind: str, folder: Path, graph: str, device) -> "EngineRunner":
        spec = json.loads((folder / "manifest.json").read_text())["engines"][graph]
        return cls(kind, folder / spec["file"], spec["inputs"], spec["outputs"], device)


# per-graph max rel error and minimum per-step latent cosine, engine vs torch of the same precision
ENGINE_TOL = {"fp32": (1e-3, 0.9999), "bf16": (5e-2, 0.99)}
# The dynamic variant's videos (frames, height, width): one per optimization profile of the tiny `dynamic`
# folder, latent grids (T, h, w) (3, 6, 10) landscape and (2, 10, 6) portrait, neither a profile's opt.
DYNAMIC_VIDEOS = {"landscape": (9, 48, 80), "portrait": (5, 80, 48)}


class TinyEngines:
    """Part 4's bench: a tiny checkpoint, its torch reference DiTs, and engine folders built from it, checked per
    graph, through the denoising loop (static) or at one grid per optimization profile (dynamic)."""

    def __init__(self, run, tmp: Path, backend: str, graphs: list[str], steps: int):
        from flf2v.export import contracts as C
        from flf2v.models import checkpoint as ck
        from flf2v.models.make_tiny import write_tiny_checkpoint
        self.run, self.tmp, self.backend, self.graphs, self.steps, self.refs = run, tmp, backend, graphs, steps, {}
        self.ckpt = write_tiny_checkpoint(tmp / "ckpt", "tiny", seed=0)
        self.preset = ck.preset_for(self.ckpt)
        self.shape = C.get_shape(self.preset, "tiny")  # static: the runners bind the manifest's shapes
        self.inputs = loop_inputs(self.preset.dit, self.shape.latent(self.preset), run.device, seed=3)

    def reference(self, precision: str):
        from flf2v.export.contracts import COMPUTE_DTYPE
        from flf2v.models import checkpoint as ck
        if precision not in self.refs:
            self.refs[precision] = ck.load_dit(self.ckpt, COMPUTE_DTYPE[precision], self.preset).to(self.run.device)
        return self.refs[precision]

    def build(self, v: dict, shape: str, graphs: list[str]) -> Path:
        from flf2v.export.build import build
        t0 = time.perf_counter()
        name = f"{self.backend}-{v['precision']}-{v['attention']}-{v['shape']}"
        folder = build(self.ckpt, shape, v["precision"], out=self.tmp / name,
                       backend=self.backend, cfg_batch=tuple(int(g[-1]) for g in graphs), only=graphs,
                       progress=False, attention=v["attention"])
        v["build_s"] = time.perf_counter() - t0
        return folder

    def run_loop(self, denoise_fns, cfg_batch: int) -> list[list]:
        """Loops stepped side by side; x after every step, per loop."""
        import torch

        from flf2v.runtime.denoise import DenoiseLoop
        from flf2v.runtime.scheduler import make_sampler
        p = self.preset
        loops = [DenoiseLoop(fn, make_sampler("unipc", self.steps, p.sample_shift), *self.inputs, p.sample_guide_scale,
                             cfg_batch) for fn in denoise_fns]
        xs = [[] for _ in loops]
        with torch.no_grad():
            for i in range(self.steps):
                for loop, out in zip(loops, xs):
                    loop._load(i)
                    loop.step()
                    out.append(loop.x.clone())
        return xs

    def static(self, v: dict) -> None:
        """Static engines per graph against the torch module, then through the denoising loop."""
        import torch

        from flf2v.export import contracts as C
        folder, prec, device = self.build(v, self.shape.name, self.graphs), v["precision"], self.run.device
        runners = {g: EngineRunner.of(self.backend, folder, g, device) for g in self.graphs}
        v["graphs"] = {}
        for g in self.graphs:
            spec = C.get_graph(self.preset, self.shape, prec, g)
            feed = [t.to(device) for t in C.sample_inputs(spec, seed=1)]
            with torch.no_grad():
                v["graphs"][g] = errors(runners[g](feed)[0], C.module(spec, {"dit": self.reference(prec)})(*feed)[0])
        # as the runtime's engine backends: the output buffer is the engine's own, reused by its next call
        fns = [torch_denoiser(self.reference(prec), C.COMPUTE_DTYPE[prec], device),
               lambda x, t, c, cl, yy: runners[f"dit_b{x.shape[0]}"]([x, t, c, cl, yy])[0]]
        if prec != "fp32":
            fns.append(torch_denoiser(self.reference("fp32"), torch.float32, device))
        v["loops"] = {}
        for g in self.graphs:
            xs = self.run_loop(fns, int(g[-1]))
            e = v["loops"][f"cfg_batch={g[-1]}"] = {"cosine_per_step": [cosine(a, b) for a, b in zip(xs[1], xs[0])]}
            if prec != "fp32":
                e["cosine_per_step_vs_fp32_torch"] = [cosine(a, b) for a, b in zip(xs[1], xs[2])]
            e.update(min_cosine=min(e["cosine_per_step"]), final=errors(xs[1][-1], xs[0][-1]))
        tol, tol_cos = ENGINE_TOL[prec]
        v.update(max_rel=max(e["max_rel"] for e in v["graphs"].values()), tol_max_rel=tol, tol_min_cosine=tol_cos,
                 min_cosine=min(e["min_cosine"] for e in v["loops"].values()))
        log(f"trt_tiny: {self.backend} {prec} attention={v['attention']}: build {v['build_s']:.1f} s, max rel "
            f"{v['max_rel']:.2e}, min per-step cosine {v['min_cosine']:.6f}")
        if not (v["max_rel"] <= tol and v["min_cosine"] >= tol_cos):
            v["problem"] = f"max rel {v['max_rel']:.3g} (tol {tol:g}), min cosine {v['min_cosine']:.6f} (tol {tol_cos})"

    def dynamic(self, v: dict) -> None:
        """The `dynamic` folder's dit_b2 at one grid per optimization profile (DYNAMIC_VIDEOS), one engine and
        context switched between them as the runtime's TrtBackend does, against the torch reference DiT at the
        same inputs. No denoising loop: the static variants cover it."""
        import torch

        from flf2v.export import contracts as C
        shape, p = C.get_shape(self.preset, "dynamic"), self.preset
        runner = EngineRunner.of(self.backend, self.build(v, shape.name, ["dit_b2"]), "dit_b2", self.run.device)
        graph, v["grids"] = C.get_graph(p, shape, v["precision"], "dit_b2"), {}
        for name, video in DYNAMIC_VIDEOS.items():
            dims = dict(zip(C.DIMS, shape.dims(p, *video)))
            profile = shape.profile_of(p, *video)  # as the runtime picks it for this video
            if profile is None:
                raise ValueError(f"{name} video {video} is in no profile of {shape.name}")
            g = graph.at(dims)
            feed = [t.to(self.run.device) for t in C.sample_inputs(g, seed=1)]
            with torch.no_grad():
                e = errors(runner(feed, dims, profile)[0], C.module(g, {"dit": self.reference(v["precision"])})(*feed)[0])
            v["grids"][name] = {"video": list(video), "latent": list(feed[0].shape[2:]), "dims": dims,
                                "profile": profile, **e}
        tol = ENGINE_TOL[v["precision"]][0]
        v.update(max_rel=max(e["max_rel"] for e in v["grids"].values()), tol_max_rel=tol)
        log(f"trt_tiny: {self.backend} {v['precision']} attention={v['attention']} dynamic: build {v['build_s']:.1f} s, "
            + ", ".join(f"{n} (profile {e['profile']}) max rel {e['max_rel']:.2e}" for n, e in v["grids"].items()))
        over = [f"{n} {e['max_rel']:.3g}" for n, e in v["grids"].items() if not e["max_rel"] <= tol]  # NaN too
        if over:
            v["problem"] = f"max rel {', '.join(over)} (tol {tol:g})"


def _variant(v: dict, tiny: TinyEngines) -> None:
    if v["attention"] in ("plugin", "sage"):
        from flf2v.kernels.trt_plugin import register_plugins
        register_plugins()
    if v["shape"].endswith("largest-tactic"):  # the launch at the most shared memory
        os.environ["FLF2V_PLUGIN_TACTICS"] = "largest"
    try:
        (tiny.dynamic if v["shape"] == "dynamic" else tiny.static)(v)
    finally:
        os.environ.pop("FLF2V_PLUGIN_TACTICS", None)


def part_trt_tiny(run, data: dict, part_end: float) -> None:
    needed = TRT_MODULES if run.cuda else ("onnxruntime", "onnxscript", "onnx_ir", "onnx_graphsurgeon", "ftfy", "regex")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"no {', '.join(missing)} on this python: TensorRT engines cannot be built here" if run.cuda
                   else f"smoke stand-in (ONNX Runtime) needs {', '.join(missing)}")
    if run.cuda:  # the dynamic variant before the plugins: a dynamic onnx-attention folder is the default build
        backend, graphs = "trt", ["dit_b1", "dit_b2"]
        variants = [(p, "onnx", "tiny") for p in ("fp32", "bf16")] + [("bf16", "onnx", "dynamic")]
        variants += [(p, "plugin", "tiny") for p in ("fp32", "bf16")] + [("bf16", "plugin", "tiny-largest-tactic")]
        variants += [("bf16", "sage", "tiny")]  # the 8-bit plugin: within the bf16 engine tolerance of exact
    else:
        backend, graphs = "ort", ["dit_b2"]
        variants = [("fp32", "onnx", "tiny"), ("fp32", "onnx", "dynamic")]
        data["note"] = "smoke: ONNX Runtime fp32 engines stand in for TensorRT (no CUDA)"
    data.update(backend=backend, graphs=graphs, steps=4 if run.smoke else 8, variants=[])
    problems = []
    with tempfile.TemporaryDirectory(prefix="flf2v-gpu-check-engines-") as tmp:
        tiny = TinyEngines(run, Path(tmp), backend, graphs, data["steps"])
        for precision, attention, shape in variants:
            v = {"precision": precision, "attention": attention, "shape": shape}
            data["variants"].append(v)
            if reason := short_of(run, part_end, 40 if shape == "dynamic" else 25):  # dynamic: two profiles
                v["skipped"] = reason
                continue
            guarded(_variant, v, tiny, trace=True)
            label = f"{precision}/{attention}" + ("/dynamic" if shape == "dynamic" else "")
            problems += [f"{label}: {v.get('problem') or v['error']}"] if "problem" in v or "error" in v else []
            free_cuda(run)
        tiny.refs.clear()
    check(problems)
