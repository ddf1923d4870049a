"""The `trt` backend: TensorRT engines of one folder on static CUDA buffers (GPU only)."""
from __future__ import annotations

import mmap
from dataclasses import dataclass, field

import torch

from flf2v.export import manifest as M
from flf2v.export.contracts import TORCH_DTYPES
from flf2v.export.manifest import EngineError

from flf2v.log import logger

from .engine_backend import DECODER_GRAPHS, ENCODER_GRAPHS, EngineBackend


@dataclass
class _Loaded:
    """A deserialized engine, its execution context, and the buffers of each video shape it ran at (root
    dims -> (generation, {tensor name: buffer})), the newest KEEP_SHAPES of them; `bound` is the shape
    the context's input shapes and addresses are set to."""
    engine: object
    ctx: object
    shapes: dict = field(default_factory=dict)
    bound: tuple | None = None


class TrtBackend(EngineBackend):
    """TensorRT engines on static CUDA buffers bound once per video shape. Outside CUDA-graph capture every engine runs on
    the backend's own stream (ordered after the caller's stream, and the caller's after it); inside a
    capture on the capturing stream, so the denoising step can be recorded as one graph. Graphs are loaded
    when first used and released when the pipeline moves on: encoders (and a previous run's decoder)
    before denoising, the DiT before VAE decoding, so the 720p peaks of the stages do not add up. The VAE caches live in
    two sets per direction, shared by the first and the chunk step and swapped each chunk (in -> out),
    instead of one input and one output copy per engine.

    Dynamic engines: a context is set to a shape (its optimization profile, then every input shape) and
    bound to that shape's buffers when the shape is first run, and again when a run switches shapes; the
    buffers of the last KEEP_SHAPES shapes stay, so a CUDA graph captured at a shape stays valid while
    its buffers do (`graph_token`). `weight_budget` (engines built with STREAM=1): the DiT keeps that many
    bytes of its weights on the GPU and TensorRT streams the rest from host memory. `keep_dit=True` keeps
    the DiT engine loaded between runs (a server on a GPU with room for the DiT and the decoder together), so
    a repeated shape replays its captured graph instead of loading the DiT and capturing again. GPU-only: never run on a CPU machine."""
    name = "trt"
    capturable = True
    static_caches = True
    KEEP_SHAPES = 2

    def __init__(self, folder, ckpt_dir, preset, device="cuda", keep_dit: bool = False, loras=(),
                 weight_budget: int | None = None):
        super().__init__(folder, ckpt_dir, preset, device, "trt", loras)
        self.set_weight_budget(weight_budget)
        if self.lora_swap:
            from . import loras as L
            raise L.refuse(self.folder, self.manifest, self.loras, "TensorRT engines",
                           M.hint_for(self.manifest, ckpt_dir, None, loras=L.lora_arg(self.loras)))
        self.keep_dit = keep_dit
        self._generation = 0  # numbers every buffer set ever allocated (a captured graph names its set)
        import tensorrt as trt
        if self.manifest.get("attention") in ("plugin", "sage"):  # DiT engines with the fused Triton attention plugins
            from flf2v.kernels.trt_plugin import register_plugins
            register_plugins()
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.stream = torch.cuda.Stream(self.device)
        self.engines: dict = {}

    def set_weight_budget(self, budget: int | None) -> None:
        """Device bytes of DiT weights (the memory plan's) for engines built with STREAM=1; None: all of them."""
        if budget is not None and not self.manifest.get("weight_streaming"):
            raise EngineError(f"{self.folder}: these DiT engines load whole; a weight budget needs engines built "
                              f"with flf2v-build --weight_streaming")
        self.weight_budget = budget

    def _deserialize(self, graph: str):
        path = self.folder / self.specs[graph]["file"]
        logger.debug("loading %s", path)
        self.unchanged(graph)
        # A memory map, not read_bytes(): a 14B DiT plan is ~33 GB that would otherwise be copied to host RAM.
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as plan:
            engine = self.runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineError(f"{path}: TensorRT could not deserialize this engine (built by another TensorRT "
                              f"version or GPU, or damaged; see the TensorRT log above); {self.hint}")
        return engine

    def check_io(self, graph: str, engine) -> None:
        """The engine's I/O tensors must be exactly the manifest's (names, shapes, dtypes, directions)."""
        trt = self.trt
        names = {trt.DataType.FLOAT: "float32", trt.DataType.BF16: "bfloat16", trt.DataType.HALF: "float16",
                 trt.DataType.INT64: "int64"}
        spec = self.specs[graph]
        # a dynamic dim ("2*hp" in the manifest) is -1 in the engine; by the GPU-path audit TensorRT may also
        # report -1 for a dim the ONNX kept symbolic though the profile fixes it (unverified): the engine's -1
        # matches any manifest dim, and `_load` sets such inputs' shapes
        want = {s["name"]: (mode, tuple(d if isinstance(d, int) else -1 for d in s["shape"]), s["dtype"])
                for mode, group in (("input", spec["inputs"]), ("output", spec["outputs"])) for s in group}
        have = {}
        for i in range(engine.num_io_tensors):
            n = engine.get_tensor_name(i)
            mode = "input" if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else "output"
            dtype = engine.get_tensor_dtype(n)
            shape = tuple(engine.get_tensor_shape(n))
            w = want.get(n, (None, ()))[1]
            if len(shape) == len(w):
                shape = tuple(b if a == -1 else a for a, b in zip(shape, w))
            have[n] = (mode, shape, names.get(dtype, str(dtype)))
        if have != want:
            diff = sorted(set(have.items()) ^ set(want.items()))
            raise EngineError(f"{self.folder / spec['file']}: the engine's I/O differs from the manifest "
                              f"({diff[:4]}); {self.hint}")

    def _load(self, graph: str):
        """(engine, context, buffers) of `graph`, the context set to the current video shape."""
        if graph not in self.engines:
            engine = self._deserialize(graph)
            self.check_io(graph, engine)
            if graph.startswith("dit") and self.weight_budget is not None:  # set before a context exists
                engine.weight_streaming_budget_v2 = min(self.weight_budget, engine.streamable_weights_size)
            ctx = engine.create_execution_context()
            if ctx is None:
                raise EngineError(f"{graph}: TensorRT could not create an execution context (out of GPU memory?)")
            self.engines[graph] = _Loaded(engine, ctx)
        e = self.engines[graph]
        ins, outs = self.io(graph)
        key = tuple(self.dims.values())
        if key not in e.shapes:
            while len(e.shapes) >= self.KEEP_SHAPES:
                e.shapes.pop(next(iter(e.shapes)))
            self._generation += 1
            # the caches are bound per call, to one of the two cache sets
            e.shapes[key] = (self._generation, {
                s["name"]: torch.empty(s["shape"], dtype=TORCH_DTYPES[s["dtype"]], device=self.device)
                for s in ins + outs if not s["name"].startswith(("cache_in.", "cache_out."))})
        bufs = e.shapes[key][1]
        if e.bound != key:
            if any(isinstance(d, str) for s in self.specs[graph]["inputs"] for d in s["shape"]) or any(
                    -1 in tuple(e.engine.get_tensor_shape(s["name"])) for s in ins):  # check_io's -1 dims too
                if e.engine.num_optimization_profiles > 1 and not self._switch_profile(e.ctx):
                    raise EngineError(f"{graph}: TensorRT refused optimization profile {self.profile}; {self.hint}")
                for s in ins:
                    if not e.ctx.set_input_shape(s["name"], s["shape"]):
                        raise EngineError(f"{graph}: TensorRT refused input {s['name']} of shape {s['shape']} "
                                          f"(outside profile {self.profile}); {self.hint}")
            for name, t in bufs.items():
                self._bind(e.ctx, name, t)
            e.bound = key
        return e.engine, e.ctx, bufs

    def _switch_profile(self, ctx) -> bool:
        """Select `self.profile` on the backend's stream, ordered after the caller's queued work and before
        whatever the caller queues next (a CUDA graph replayed on the caller's stream included)."""
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        ok = ctx.set_optimization_profile_async(self.profile, self.stream.cuda_stream)
        caller.wait_stream(self.stream)
        return ok

    def graph_token(self, cfg_batch: int):
        """Names the DiT buffers a CUDA graph captured now would use at the current shape (None when the
        DiT is not loaded); a graph captured under another token must not be replayed. Sets the
        context to the current shape, as the graph expects."""
        loaded = [g for g in (f"dit_b{cfg_batch}", f"dit_cached_b{cfg_batch}") if g in self.engines]
        if not loaded or self.dims is None:
            return None
        for g in loaded:
            self._load(g)
        return tuple(self.engines[g].shapes[tuple(self.dims.values())][0] for g in loaded)

    @staticmethod
    def _bind(ctx, name: str, t: torch.Tensor) -> None:
        if not ctx.set_tensor_address(name, t.data_ptr()):
            raise RuntimeError(f"TensorRT refused the address of {name} ({tuple(t.shape)} {t.dtype})")

    def release_encoders(self) -> None:
        self._release(ENCODER_GRAPHS)

    def prepare_denoise(self) -> None:  # the decoder of a previous run too: only the DiT stays for the loop
        self._release(ENCODER_GRAPHS + DECODER_GRAPHS)

    def finish_denoise(self) -> None:
        if not self.keep_dit:
            self._release([g for g in self.engines if g.startswith("dit_")])

    def _release(self, graphs) -> None:
        if any(g in self.engines for g in graphs):
            self._synchronize()  # nothing may still run on what is freed
            for g in graphs:
                self.engines.pop(g, None)
            self._drop_cache_sets(self.engines)
            torch.cuda.empty_cache()

    def _synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def _enqueue(self, graph: str, ctx) -> None:
        caller = torch.cuda.current_stream(self.device)
        if torch.cuda.is_current_stream_capturing():
            stream = caller  # recorded into the caller's CUDA graph
        else:  # not the legacy default stream, which would serialise with everything else on the device
            stream = self.stream
            stream.wait_stream(caller)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue {graph}")
        if stream is not caller:
            caller.wait_stream(stream)

    def _run(self, graph: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        _, ctx, bufs = self._load(graph)
        ins, outs = self.io(graph)
        pair = self._cache_pair(graph, inputs)
        if pair:
            src, dst = pair
            for i, (c_in, c_out) in enumerate(zip(src, dst)):
                self._bind(ctx, f"cache_in.{i}", c_in)
                self._bind(ctx, f"cache_out.{i}", c_out)
        for s, x in zip(ins, inputs):
            if s["name"] in bufs and x.data_ptr() != bufs[s["name"]].data_ptr():
                bufs[s["name"]].copy_(x)
        self._enqueue(graph, ctx)
        return [bufs[s["name"]] if s["name"] in bufs else dst[int(s["name"].split(".")[1])] for s in outs]

