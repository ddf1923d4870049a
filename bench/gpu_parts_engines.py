"""Parts 4 and 7 of `make gpu-check`, compiled engines against torch: tiny TensorRT DiT engines (and part 5's
DiT slice as one), AOTInductor packages. Box-safe at import: stdlib only."""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from flf2v.bench.gpu_common import (Skip, absent, build_random_dit, check, cosine, dtype_of, errors, free_cuda,
                                    guarded, log, loop_inputs, model_preset, short_of, slice_inputs, timed_call,
                                    timed_s, tokens_of, torch_denoiser, video_shapes)

TRT_MODULES = ("tensorrt", "polygraphy", "onnxscript", "onnx_ir", "onnx_graphsurgeon", "ftfy", "regex")


# ---- 4. tiny engines vs torch --------------------------------------------------------------------------

class EngineRunner:
    """One engine file: TensorRT (bound as runtime.trt_backend.TrtBackend binds it, its buffers reused) or, in the
    CPU smoke test, ONNX Runtime. A dynamic engine (manifest dims such as "2*hp") runs at root dims `dims`
    ({"T": 3, "hp": 3, "wp": 5}) in the optimization profile `profile` holding them; ONNX Runtime ignores both."""

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
        name = f"{self.backend}-{v['precision']}-{v['attention']}-{v['shape']}"
        return timed_call(self.run, v, "build_s", build, self.ckpt, shape, v["precision"], out=self.tmp / name,
                          backend=self.backend, cfg_batch=tuple(int(g[-1]) for g in graphs), only=graphs,
                          progress=False, attention=v["attention"])

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
        """The `dynamic` folder's dit_b2 at each of DYNAMIC_VIDEOS, its context switched between profiles as
        TrtBackend does, against torch. No denoising loop: the static variants cover it."""
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
        if over := [f"{n} {e['max_rel']:.3g}" for n, e in v["grids"].items() if not e["max_rel"] <= tol]:  # NaN too
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
    if missing := absent(TRT_MODULES if run.cuda else ("onnxruntime", *TRT_MODULES[2:])):
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


def trt_slice(run, model, slice_cfg, preset, shape, inputs, part_end: float) -> dict:
    """The slice as a bf16 TensorRT engine: checkpoint -> export (streamed) -> build -> time one forward."""
    if not run.cuda:
        return {"skipped": "no CUDA"}
    if missing := absent(TRT_MODULES[:5]):
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
            timed_call(run, row, "build_s", build_trt_engine, onnx_path, tmp / "dit_b1.engine", graph, 3,
                       tmp / "timing.cache")
            runner = EngineRunner("trt", tmp / "dit_b1.engine", [s.to_json() for s in graph.inputs],
                                  [s.to_json() for s in graph.outputs], run.device)
            with torch.no_grad():
                out = runner(list(inputs))[0].clone()
                row["forward_s"], _ = timed_s(run, lambda: runner(list(inputs)), 3)
                model.attention = "sdpa"
                row["vs_torch_sdpa"] = errors(out, model(*inputs))
    return guarded(measure, {})


# ---- 7. AOTInductor ------------------------------------------------------------------------------------

# the flf2v Triton kernels (kernels/attention.py, cross_attention.py) as named in a package's code
FLF2V_KERNELS = ("self_attn_fwd", "cross_attn_fwd", "rms_stats", "norm_rope")


def kernels_in(path) -> list[str]:
    """Which flf2v kernels a `.pt2` package's files name (file names and generated code)."""
    found = set()
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            text = name + (z.read(name).decode(errors="ignore") if name.endswith((".cpp", ".h", ".py", ".json",
                                                                                   ".txt")) else "")
            found |= {k for k in FLF2V_KERNELS if k in text}
    return sorted(found)


def _slice(row: dict, run, attention: str = "sdpa") -> None:
    """Part 5's DiT slice compiled into one AOTI package, against torch eager (sdpa) on the same weights.
    attention="triton": the DiT with the flf2v triton_ops (kernels/ops.py), which AOTInductor should compile
    into the package; `kernels_in_package` says whether it did."""
    import torch

    from flf2v.export.contracts import DiTFull
    preset = model_preset(run)
    cfg = dataclasses.replace(preset.dit, num_layers=2)
    dtype, dtype_name = dtype_of(run)
    L, latent, _ = tokens_of(preset, video_shapes(run)[0])
    model = compiled = build_random_dit(cfg, dtype, run.device)
    inputs = slice_inputs(run, cfg, latent)
    row.update(blocks=2, tokens=L, dtype=dtype_name, attention=attention)
    if attention == "triton":
        importlib.import_module("flf2v.kernels.ops")  # registers the ops
        compiled = build_random_dit(cfg, dtype, run.device, attention="triton")
        compiled.load_state_dict(model.state_dict())
    with tempfile.TemporaryDirectory(prefix="flf2v-gpu-check-aoti-") as tmp, torch.no_grad():
        mod, ref_mod = DiTFull(compiled).eval(), DiTFull(model).eval()
        ep = timed_call(run, row, "export_s", torch.export.export, mod, inputs)
        path = timed_call(run, row, "compile_s", torch._inductor.aoti_compile_and_package, ep,
                          package_path=str(Path(tmp) / "dit_b1.pt2"))
        row.update(package_mib=Path(path).stat().st_size / 2**20, kernels_in_package=kernels_in(path))
        pkg, reps = torch._inductor.aoti_load_package(path), 1 if run.smoke else 3
        out = pkg(*inputs)[0]
        row["aoti_forward_s"], _ = timed_s(run, lambda: pkg(*inputs), reps)
        ref = ref_mod(*inputs)[0]
        row["eager_forward_s"], _ = timed_s(run, lambda: ref_mod(*inputs), reps)
        row.update(vs_eager=errors(out, ref), speedup_vs_eager=row["eager_forward_s"] / row["aoti_forward_s"])


def _tiny(row: dict, run) -> None:
    import torch

    from flf2v.export.build import build
    from flf2v.models.make_tiny import write_demo_frames, write_tiny_checkpoint
    from flf2v.runtime.denoise import DenoiseLoop
    from flf2v.runtime.media import load_image
    from flf2v.runtime.pipeline import Pipeline
    with tempfile.TemporaryDirectory(prefix="flf2v-gpu-check-aoti-tiny-") as tmp:
        tmp = Path(tmp)
        ckpt = write_tiny_checkpoint(tmp / "ckpt", "tiny", seed=0)
        frames = [load_image(p) for p in write_demo_frames(tmp / "frames", (64, 64))]
        folder = timed_call(run, row, "build_s", build, ckpt, "tiny", "bf16", out=tmp / "aoti", backend="aoti",
                            cfg_batch=(2,), progress=False)
        row["folder_mib"] = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        kw = dict(size="64*64", frame_num=9, seed=1, sample_steps=4, progress=False)
        ref = Pipeline.from_checkpoint(ckpt, dtype=torch.bfloat16, device=run.device).generate("a ball", *frames, **kw)
        captures, capture = [], DenoiseLoop.capture
        DenoiseLoop.capture = lambda loop: (captures.append(1), capture(loop))[1]  # counted, not changed
        try:
            got = timed_call(run, row, "first_run_s",
                             lambda: Pipeline.from_engines(folder, device=run.device).generate("a ball", *frames, **kw))
        finally:
            DenoiseLoop.capture = capture
        row["steps_captured"] = len(captures)  # the packages' calls inside a CUDA graph of the step
        row["video_vs_torch_bf16"] = errors(got.float(), ref.float())
        row["streamed"] = guarded(_streamed, {}, run, ckpt, folder, frames, kw, got)


def _streamed(row: dict, run, ckpt, folder, frames, kw, whole) -> None:
    """The tiny folder's DiT rebuilt with STREAM=1 (embed, block, head packages) and run with no block resident:
    both blocks copied into the two device slots on the side stream, against the whole-package video."""
    from flf2v.export.build import build
    from flf2v.models import checkpoint as ck
    from flf2v.runtime.backends import open_backend
    from flf2v.runtime.pipeline import Pipeline
    streamed = folder.with_name("aoti-stream")
    shutil.copytree(folder, streamed)
    timed_call(run, row, "build_s", build, ckpt, "tiny", "bf16", out=streamed, backend="aoti", cfg_batch=(2,),
               only=["dit_b2"], weight_streaming=True, force=True, progress=False)
    preset = ck.preset_for(ckpt)
    backend = open_backend("aoti", streamed, ckpt, preset, run.device, resident_blocks=0)
    got = timed_call(run, row, "first_run_s", lambda: Pipeline(
        backend, ck.load_tokenizer(ckpt, preset), preset, run.device).generate("a ball", *frames, **kw))
    row.update(block_copies=backend.blocks.copies, pinned_bytes=backend.blocks.pinned_bytes,
               video_vs_whole=errors(got.float(), whole.float()))


def part_aoti(run, data: dict, part_end: float) -> None:  # the slice as `flf2v-build --backend aoti` compiles it
    _slice(data.setdefault("dit_slice", {}), run)  # a failure here fails the part
    free_cuda(run)  # the slice's weights and package went with _slice's frame
    why = ("smoke: the Triton kernels compile into a package only on CUDA (tests/test_aoti.py checks the ops "
           "export on a CPU)" if run.smoke else short_of(run, part_end, 120))
    data["dit_slice_triton"] = {"skipped": why} if why else guarded(_slice, {}, run, "triton")
    free_cuda(run)
    missing = absent(("PIL", "ftfy", "regex", "transformers"))
    why = ("smoke: tests/test_aoti.py builds and checks the tiny AOTI folder on a CPU" if run.smoke else
           f"no {', '.join(missing)} on this python (the tokenizer and images need them)" if missing else
           short_of(run, part_end, 60))
    data["tiny"] = {"skipped": why} if why else guarded(_tiny, {}, run)
