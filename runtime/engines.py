"""Engine backends: the graphs of one `flf2v-build` folder behind the TorchBackend interface.

`ort` runs the fp32 ONNX graphs with ONNX Runtime (CPU EP here, CUDA EP where onnxruntime-gpu is
installed); `trt` runs TensorRT engines with static device buffers bound once per video shape. The
manifest (export/manifest.py) decides what a folder may serve: the same model preset, checkpoint, output
grids and (for TensorRT) GPU and TensorRT version; anything else is refused with the `make engines`
command that builds what would serve it. `find_engines` picks, among the folders of a root (one per
shape), the one that serves a run.

Shapes. A static folder serves one video shape. A dynamic one serves every grid inside one of its
profiles (contracts.DynamicShape): `set_video(height, width, frames)` checks that and fixes the root dims
(T, hp, wp) every dynamic I/O shape of the manifest is computed from (`io`); the buffers of a shape are
allocated when it is first run.
The VAE chunk loop lives here: each chunk step's caches come back as outputs and go in as the next
step's inputs.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flf2v.export import contracts as C
from flf2v.export import manifest as M
from flf2v.export.contracts import TORCH_DTYPES
from flf2v.export.manifest import EngineError
from flf2v.models.config import Preset
from flf2v.models.vae import decode_chunks, encode_chunks

ENCODER_GRAPHS = ("t5", "clip", "vae_encode_first", "vae_encode_chunk")
DECODER_GRAPHS = ("vae_decode_first", "vae_decode_chunk")
# torch dtype -> what IOBinding.bind_input/bind_output take (bfloat16 has no NumPy type: the ONNX enum)
ORT_ELEMENT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
                     torch.int32: np.int32, torch.bool: np.bool_, torch.bfloat16: 16}  # 16: TensorProto.BFLOAT16


def read_manifest(folder: Path, ckpt_dir, preset: Preset, kind: str, fingerprint: str | None = None) -> dict:
    """The folder's validated manifest (export/manifest.py), its ONNX external data checked too."""
    m = M.validate(folder, ckpt_dir, preset, kind, fingerprint)
    if kind == "ort":
        for e in m["engines"].values():
            check_external_data(folder / e["file"], folder)
    return m


def engine_video_shape(m: dict) -> tuple[int, int, int] | None:
    """(height, width, frames) a static folder serves; None for a dynamic one."""
    s = M.shape_of(m)
    return None if s.dynamic else (s.height, s.width, s.frame_num)


def find_engines(roots, ckpt_dir, preset: Preset, kind: str, serves,
                 prefer=None) -> tuple[Path | None, list[str], list[str]]:
    """The folder under `roots` whose engines are current for `ckpt_dir` on this machine and whose shape
    `serves(manifest) -> bool` accepts: one that `prefer(manifest)` accepts (the run's LoRAs built in) before
    one it does not, a static one before a dynamic one (TensorRT may be faster at a fixed shape); then why
    the others were passed over: folders that cannot serve this checkpoint here (each reason with its fix),
    and folders of other shapes."""
    fingerprint = M.checkpoint_fingerprint(ckpt_dir)  # read once for all candidates
    unusable, shapes, found = [], [], []
    for folder in (f for r in roots for f in M.folders_under(r)):
        try:
            m = read_manifest(folder, ckpt_dir, preset, kind, fingerprint)
        except EngineError as e:
            unusable.append(str(e))
            continue
        if serves(m):
            found.append((prefer is not None and not prefer(m), M.shape_of(m).dynamic, len(found), folder))
        else:
            shapes.append(f"{folder} serves {M.describe(m)}")
    return (min(found)[-1] if found else None), unusable, shapes


def build_serving(preset: Preset, height: int, width: int, frame_num: int) -> str:
    """The shape (`flf2v-build --preset`) that serves a video: the first dynamic one holding it, else the
    static `<W>x<H>x<frames>`."""
    for name, shape in C.dynamic_shapes(preset).items():
        if shape.profile_of(preset, frame_num, height, width) is not None:
            return name
    return f"{width}x{height}x{frame_num}"


def check_external_data(onnx_path: Path, folder: Path) -> None:
    """Refuse ONNX files whose external weights point outside the engine folder."""
    import onnx
    model = onnx.load(str(onnx_path), load_external_data=False)
    root = folder.resolve()
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = {e.key: e.value for e in t.external_data}.get("location", "")
        target = (onnx_path.parent / loc).resolve()
        if Path(loc).is_absolute() or root not in target.parents:
            raise EngineError(f"{onnx_path}: external data of {t.name!r} points outside {folder} ({loc!r}); "
                              f"refusing to load it, rebuild the engines")


class EngineBackend:
    """Shared logic; subclasses provide `_run(graph, inputs) -> outputs` (lists of tensors). A backend with
    `static_caches` keeps the VAE caches in two sets per direction (`cache_sets`), swapped each chunk."""
    capturable = False
    static_caches = False

    def __init__(self, folder, ckpt_dir, preset: Preset, device, kind: str, loras=()):
        from . import loras as L
        self.folder, self.preset, self.device = Path(folder), preset, torch.device(device)
        self.ckpt_dir = ckpt_dir
        self.manifest = read_manifest(self.folder, ckpt_dir, preset, kind)
        self.loras = list(loras)  # [(models.lora.LoRA, scale)] this run applies to the DiT (runtime/loras.py)
        self.lora_swap = L.needs_swap(self.manifest, self.loras)
        self.shape = M.shape_of(self.manifest)
        self.hint = M.rebuild_hint(ckpt_dir, self.folder, self.shape.name, self.manifest.get("precision"),
                                   self.manifest.get("attention"), backend=kind)
        self.video_shape = engine_video_shape(self.manifest)  # None: dynamic, any shape of its profiles
        self.specs = {g: e for g, e in self.manifest["engines"].items()}
        self.cfg_batches = tuple(int(g[-1]) for g in self.specs if g.startswith("dit_b"))
        self.cache_sets: dict = {}  # "encode"/"decode" -> ([set A], [set B]), with static_caches
        self.dims: dict[str, int] | None = None if self.shape.dynamic else {}  # root dims of the current shape
        self.profile = 0  # the optimization profile serving them
        self._io: dict = {}

    # -- video shape ---------------------------------------------------------------------------------
    def check_video(self, height: int, width: int, frame_num: int) -> int:
        """The optimization profile serving this video shape (0 for static engines); EngineError naming
        the build that would serve it when these engines cannot."""
        if not self.shape.dynamic:
            profile = 0 if (height, width, frame_num) == self.video_shape else None
        else:
            profile = self.shape.profile_of(self.preset, frame_num, height, width)
        if profile is None:
            raise EngineError(self._outside(height, width, frame_num))
        return profile

    def set_video(self, height: int, width: int, frame_num: int) -> None:
        """Fix the video shape of the next runs (checked as by `check_video`)."""
        profile = self.check_video(height, width, frame_num)
        if not self.shape.dynamic:
            return
        dims = dict(zip(C.DIMS, self.shape.dims(self.preset, frame_num, height, width)))
        if dims != self.dims:
            self.dims, self.profile = dims, profile
            self._resized()

    def _outside(self, height: int, width: int, frame_num: int) -> str:
        name = build_serving(self.preset, height, width, frame_num)
        hint = M.rebuild_hint(self.ckpt_dir, self.folder.parent / name, name, self.manifest.get("precision"),
                              self.manifest.get("attention"), backend=self.manifest.get("backend"))
        return (f"the engines in {self.folder} serve {M.describe(self.manifest)}, but this run needs {width}x"
                f"{height}, {frame_num} frames (from --size, --frame_num and the first frame's aspect ratio); "
                f"{hint} for engines that serve it, or use --backend torch")

    def _resized(self) -> None:
        """The video shape changed: buffers of the old one are not reused (subclasses drop bindings)."""
        self.cache_sets.clear()

    def io(self, graph: str) -> tuple[list[dict], list[dict]]:
        """(inputs, outputs) specs of `graph` at the current video shape: every dim an int."""
        if self.dims is None:
            raise RuntimeError(f"{graph}: dynamic engines run after set_video(height, width, frames)")
        key = (graph, tuple(self.dims.values()))
        if key not in self._io:
            spec = self.specs[graph]
            self._io[key] = tuple([{**s, "shape": [C.dim_value(d, self.dims) for d in s["shape"]]} for s in spec[k]]
                                  for k in ("inputs", "outputs"))
        return self._io[key]

    def _zero_caches(self, graph: str) -> list[torch.Tensor]:
        return [torch.zeros(s["shape"], dtype=TORCH_DTYPES[s["dtype"]], device=self.device)
                for s in self.io(graph)[0] if s["name"].startswith("cache_in.")]

    def _caches(self, graph: str) -> list[torch.Tensor]:
        """The zero caches a first VAE chunk step starts from: fresh ones, or with static buffers the
        first of the two cache sets, zeroed."""
        if not self.static_caches:
            return self._zero_caches(graph)
        return [c.zero_() for c in self._cache_set(graph, 0)]

    # -- static VAE caches: two sets per direction, shared by the first and the chunk step -------------
    def _cache_set(self, graph: str, which: int) -> list[torch.Tensor]:
        kind = "decode" if "decode" in graph else "encode"
        if kind not in self.cache_sets:
            self.cache_sets[kind] = (self._zero_caches(graph), self._zero_caches(graph))
        return self.cache_sets[kind][which]

    def _cache_pair(self, graph: str, inputs: list[torch.Tensor]):
        """(caches in, caches out) for one VAE chunk step, or None for a graph without caches. Ping-pong:
        the outputs go to the set the inputs are not in (inputs from elsewhere are copied into set A)."""
        caches_in = [x for s, x in zip(self.specs[graph]["inputs"], inputs) if s["name"].startswith("cache_in.")]
        if not caches_in:
            return None
        a, b = self._cache_set(graph, 0), self._cache_set(graph, 1)
        src = b if caches_in[0].data_ptr() == b[0].data_ptr() else a
        for c, x in zip(src, caches_in):
            if c.data_ptr() != x.data_ptr():
                c.copy_(x)
        return src, (a if src is b else b)

    def _drop_cache_sets(self, loaded) -> None:
        """Forget the cache sets of a direction none of whose graphs is still `loaded`."""
        for kind in ("encode", "decode"):
            if all(not g.startswith(f"vae_{kind}") for g in loaded):
                self.cache_sets.pop(kind, None)

    # -- the TorchBackend interface ------------------------------------------------------------------
    def encode_text(self, ids, mask):
        # The T5 engine has a static batch of 2 ([prompt, negative prompt]); a CFG-free run brings the prompt
        # alone, which fills both rows (a padding row would cost the same) and keeps the first.
        rows = self.specs["t5"]["inputs"][0]["shape"][0]
        if ids.shape[0] == rows:
            return self._run("t5", [ids, mask])[0]
        return self._run("t5", [ids.repeat(rows, 1), mask.repeat(rows, 1)])[0][:1]

    def encode_image(self, pixels):
        return self._run("clip", [pixels.float()])[0]

    def release_encoders(self) -> None:
        pass

    def prepare_denoise(self) -> None:
        self.release_encoders()

    def finish_denoise(self) -> None:
        pass

    def denoise(self, x, t, context, clip_fea, y):
        return self._run(f"dit_b{x.shape[0]}", [x, t, context, clip_fea, y])[0]

    @property
    def steps_cache(self) -> bool:
        """Whether the folder holds the step cache's graphs (dit_b* with `hidden`, dit_cached_b*)."""
        return all(f"dit_cached_b{b}" in self.specs and len(self.specs[f"dit_b{b}"]["outputs"]) == 2
                   for b in self.cfg_batches)

    def denoise_full(self, x, t, context, clip_fea, y):
        v, hidden = self._run(f"dit_b{x.shape[0]}", [x, t, context, clip_fea, y])
        return v, hidden

    def denoise_cached(self, x, x_prev, t, y, hidden):
        return self._run(f"dit_cached_b{x.shape[0]}", [x, x_prev, t, y, hidden])[0]

    def _vae_step(self, kind: str):
        def step(x, caches, first):
            out = self._run(f"vae_{kind}_{'first' if first else 'chunk'}", [x.float(), *caches])
            return out[0].clone(), out[1:]  # clone: bound outputs are reused on the next call
        return step

    def vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        caches = self._caches("vae_encode_first")
        return encode_chunks(self._vae_step("encode"), video, caches, self.preset.vae.stride[0])

    def vae_decode(self, z: torch.Tensor, progress=None) -> torch.Tensor:
        return decode_chunks(self._vae_step("decode"), z, self._caches("vae_decode_first"), progress)


class OrtBackend(EngineBackend):
    """ONNX Runtime sessions, one per graph, loaded when first used.

    With `io_binding` (the default) nothing crosses to NumPy: every input is bound to the torch tensor's
    own memory (made contiguous, of the manifest's dtype, on the backend's device; no copy when it already
    is), and every output to a torch buffer allocated once per graph from the manifest and reused by every
    call, like TrtBackend's (so a result is valid until the graph's next call: the denoiser contract of
    runtime/denoise.py). The VAE caches ping-pong between two static sets. `io_binding=False` is the
    previous path (inputs to NumPy, fresh outputs back through `torch.from_numpy`), kept for comparison:
    `flf2v-bench --backends ort,ort-numpy`. `host_transfers` counts the tensors that path moved.

    On CUDA (onnxruntime-gpu) the same binding uses device "cuda", and the DiT sessions enable ORT's own
    CUDA-graph capture (`enable_cuda_graph`, which needs fixed input and output addresses: their inputs
    are copied into static buffers bound once). UNVERIFIED: written from the ONNX Runtime documentation,
    never run (no GPU with onnxruntime-gpu here)."""
    name = "ort"

    def __init__(self, folder, ckpt_dir, preset, device="cpu", threads: int | None = None, io_binding: bool = True,
                 loras=()):
        super().__init__(folder, ckpt_dir, preset, device, "ort", loras)
        import onnxruntime as ort
        self._ort = ort
        self.io_binding = self.static_caches = io_binding
        self.opts = self._options(threads)
        self.cuda = self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        if self.device.type == "cuda" and not self.cuda:
            # the CPU build (plain `pip install onnxruntime`) cannot bind CUDA memory: it would fail at the
            # first call with "no data transfer registered"
            raise EngineError(f"--device {self.device}: this onnxruntime {ort.__version__} has no CUDA provider (the "
                              f"CPU build); install onnxruntime-gpu (`make setup ORT=gpu`) or run these engines "
                              f"with --device cpu")
        self.providers = (["CUDAExecutionProvider"] if self.cuda else []) + ["CPUExecutionProvider"]
        precision = self.manifest["precision"]
        if precision != "fp32" and not self.cuda:
            # ORT's CPU provider has no bf16 kernels for these graphs: it would fail deep in a session
            cpu_hint = self.hint.replace(f"PRECISION={precision}", "PRECISION=fp32")
            raise EngineError(f"{self.folder} holds {precision} ONNX Runtime engines, which run on the CUDA "
                              f"provider only (onnxruntime-gpu, --device cuda); {cpu_hint} for the CPU")
        self.sessions: dict = {}
        self.bindings: dict = {}  # (graph, cache set in) -> (IOBinding, {name: static buffer}), io_binding
        self.host_transfers = 0

    def _options(self, threads: int | None):
        opts = self._ort.SessionOptions()
        opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning ORT threads keep the cores busy between calls and starve the torch ops in between
        # (measured on the 2-vCPU dev machine: tiny end to end 0.3 s -> 0.2 s).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        return opts

    def _model(self, graph: str):
        """What a session opens: the graph's file, or for a DiT whose LoRAs differ from the build's the
        graph with the run's LoRAs swapped in (runtime/loras.py)."""
        path = self.folder / self.specs[graph]["file"]
        if not (self.lora_swap and graph.startswith("dit_")):
            return str(path)
        from . import loras as L
        hint = M.rebuild_hint(self.ckpt_dir, self.folder, self.shape.name, self.manifest.get("precision"),
                              self.manifest.get("attention"), L.lora_arg(self.loras))
        # the cached step holds only the embeddings and head: the LoRA keys it has, if any
        return L.ort_model(path, self.manifest, self.ckpt_dir, self.loras, hint, subset=graph.startswith("dit_cached"))

    def _cuda_graph(self, graph: str) -> bool:  # gpu, unverified; ORT's graphs need one fixed shape
        return self.cuda and self.io_binding and graph.startswith("dit_") and not self.shape.dynamic

    def _resized(self) -> None:
        super()._resized()
        self.bindings.clear()

    def session(self, graph: str):
        if graph not in self.sessions:
            providers = self.providers
            if self.cuda:  # gpu, unverified
                cuda = {"device_id": str(self.device.index or 0)}
                if self._cuda_graph(graph):
                    cuda["enable_cuda_graph"] = "1"
                providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
            self.sessions[graph] = self._ort.InferenceSession(self._model(graph), self.opts, providers=providers)
        return self.sessions[graph]

    def release_encoders(self) -> None:
        for g in ENCODER_GRAPHS:
            self.sessions.pop(g, None)
            for which in (0, 1):
                self.bindings.pop((g, which), None)
        self._drop_cache_sets(self.sessions)

    # -- IO binding ----------------------------------------------------------------------------------
    def _bind(self, bind, name: str, t: torch.Tensor) -> None:
        bind(name, self.device.type, self.device.index or 0, ORT_ELEMENT_TYPES[t.dtype], list(t.shape), t.data_ptr())

    def _binding(self, graph: str, which: int = 0):
        """(IOBinding, {name: static buffer}) of a graph; a VAE graph has two, one per ping-pong direction
        (caches in set `which`, out to the other), so its caches are bound once, not every chunk."""
        if (graph, which) not in self.bindings:
            (ins, outs), io = self.io(graph), self.session(graph).io_binding()
            other = next((v for (g, _), v in self.bindings.items() if g == graph), None)
            bufs = other[1] if other else {}  # both directions share the other static buffers
            static_in = self._cuda_graph(graph)
            for s in outs + (ins if static_in else []):
                if not s["name"].startswith(("cache_in.", "cache_out.")) and s["name"] not in bufs:
                    bufs[s["name"]] = torch.empty(s["shape"], dtype=TORCH_DTYPES[s["dtype"]], device=self.device)
            for s in outs:
                if s["name"] in bufs:
                    self._bind(io.bind_output, s["name"], bufs[s["name"]])
            for s in ins:
                if static_in and s["name"] in bufs:  # static inputs (CUDA graphs): bound once, filled per call
                    self._bind(io.bind_input, s["name"], bufs[s["name"]])
            if any(s["name"].startswith("cache_in.") for s in ins):
                src, dst = self._cache_set(graph, which), self._cache_set(graph, 1 - which)
                for i, (c_in, c_out) in enumerate(zip(src, dst)):
                    self._bind(io.bind_input, f"cache_in.{i}", c_in)
                    self._bind(io.bind_output, f"cache_out.{i}", c_out)
            self.bindings[(graph, which)] = (io, bufs)
        return self.bindings[(graph, which)]

    def _run_bound(self, graph: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        ins, outs = self.io(graph)
        pair = self._cache_pair(graph, inputs)
        which = 0 if not pair or pair[0] is self._cache_set(graph, 0) else 1
        io, bufs = self._binding(graph, which)
        keep = []  # the bound tensors stay alive until the run is over
        for s, x in zip(ins, inputs):
            name = s["name"]
            if name.startswith("cache_in."):
                continue
            if name in bufs:  # gpu: a static input buffer
                if x.data_ptr() != bufs[name].data_ptr():
                    bufs[name].copy_(x)
                continue
            x = x.detach().to(self.device, TORCH_DTYPES[s["dtype"]]).contiguous()
            if list(x.shape) != list(s["shape"]):
                raise ValueError(f"{graph}: input {name} has shape {tuple(x.shape)}, the engine takes "
                                 f"{tuple(s['shape'])}")
            keep.append(x)
            self._bind(io.bind_input, name, x)
        if self.cuda:  # gpu, unverified: ORT runs on its own stream; torch's work on the inputs comes first
            torch.cuda.current_stream(self.device).synchronize()
        self.session(graph).run_with_iobinding(io)
        return [bufs[s["name"]] if s["name"] in bufs else pair[1][int(s["name"].split(".")[1])] for s in outs]

    def _run(self, graph: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.io_binding:
            return self._run_bound(graph, inputs)
        spec = self.specs[graph]
        feeds = {s["name"]: np.ascontiguousarray(x.detach().cpu().numpy()) for s, x in zip(spec["inputs"], inputs)}
        outs = self.session(graph).run(None, feeds)
        self.host_transfers += len(feeds) + len(outs)
        return [torch.from_numpy(o).to(self.device) for o in outs]


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
    its buffers do (`graph_token`). `keep_dit=True` keeps the DiT engine loaded between runs (a server on a
    GPU with room for the DiT and the decoder together), so a repeated shape replays its captured graph
    instead of loading the DiT and capturing again. GPU-only: never run on a CPU machine."""
    name = "trt"
    capturable = True
    static_caches = True
    KEEP_SHAPES = 2

    def __init__(self, folder, ckpt_dir, preset, device="cuda", keep_dit: bool = False, loras=()):
        super().__init__(folder, ckpt_dir, preset, device, "trt", loras)
        if self.lora_swap:
            from . import loras as L
            raise L.refuse(self.folder, self.manifest, self.loras, "TensorRT engines", M.rebuild_hint(
                ckpt_dir, None, self.shape.name, self.manifest.get("precision"),
                self.manifest.get("attention"), L.lora_arg(self.loras)))
        self.keep_dit = keep_dit
        self._generation = 0  # numbers every buffer set ever allocated (a captured graph names its set)
        import tensorrt as trt
        if self.manifest.get("attention") == "plugin":  # DiT engines with the fused Triton attention plugins
            from flf2v.kernels.trt_plugin import register_plugins
            register_plugins()
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.stream = torch.cuda.Stream(self.device)
        self.engines: dict = {}

    def _deserialize(self, graph: str):
        path = self.folder / self.specs[graph]["file"]
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


def check_backend(kind: str, device) -> None:
    """EngineError (one line naming the fix) unless this machine can run `kind` engines on `device`."""
    if kind not in ("ort", "trt", "aoti"):
        raise EngineError(f"unknown backend {kind!r}; choose torch, ort, trt or aoti")
    if kind == "trt":
        if not torch.cuda.is_available() or torch.device(device).type != "cuda":
            raise EngineError("--backend trt needs a CUDA GPU; use --backend ort or torch here")
        try:
            import tensorrt  # noqa: F401
        except ImportError as e:
            raise EngineError(f"--backend trt needs TensorRT, which does not import here ({e}); "
                              f"{M.TRT_INSTALL}") from None


def open_backend(kind: str, folder, ckpt_dir, preset: Preset, device, **options) -> EngineBackend:
    """`options`: backend keywords, e.g. io_binding=False for OrtBackend's NumPy path."""
    check_backend(kind, device)
    if kind == "aoti":
        from .aoti_backend import AotiBackend
        return AotiBackend(folder, ckpt_dir, preset, device, **options)
    return (OrtBackend if kind == "ort" else TrtBackend)(folder, ckpt_dir, preset, device, **options)
