"""The `ort` backend: the fp32 (CPU) or bf16 (CUDA provider) ONNX graphs of one folder in ONNX Runtime."""
from __future__ import annotations

import numpy as np
import torch

from flf2v.export import manifest as M
from flf2v.export.contracts import TORCH_DTYPES
from flf2v.export.manifest import EngineError

from flf2v.log import logger

from .engine_backend import ENCODER_GRAPHS, EngineBackend

# torch dtype -> what IOBinding.bind_input/bind_output take (bfloat16 has no NumPy type: the ONNX enum)
ORT_ELEMENT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
                     torch.int32: np.int32, torch.bool: np.bool_, torch.bfloat16: 16}  # 16: TensorProto.BFLOAT16


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
            cpu_hint = M.hint_for(self.manifest, self.ckpt_dir, None, precision="fp32")  # a folder of its own
            raise EngineError(f"{self.folder} holds {precision} ONNX Runtime engines, which run on the CUDA "
                              f"provider only (onnxruntime-gpu, --device cuda); {cpu_hint} for the CPU (runs "
                              f"without --engines find it)")
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
        hint = M.hint_for(self.manifest, self.ckpt_dir, self.folder, loras=L.lora_arg(self.loras))
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
            logger.debug("loading %s (ONNX Runtime, %s)", graph, self.folder)
            self.unchanged(graph)
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

