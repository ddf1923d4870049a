"""Engine backends: the graphs of one `flf2v-build` folder behind the TorchBackend interface.

`ort` runs the fp32 ONNX graphs with ONNX Runtime (CPU EP here, CUDA EP where onnxruntime-gpu is
installed); `trt` runs TensorRT engines with static device buffers bound once. The manifest decides what
a folder may serve: the same model preset, checkpoint, output grid and (for TensorRT) GPU and TensorRT
version; anything else is refused with the `make engines` command that rebuilds it. The VAE chunk
loop lives here: each chunk step's caches come back as outputs and go in as the next step's inputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from flf2v.models.config import Preset
from flf2v.models.vae import decode_chunks, encode_chunks

from .media import InputError

MANIFEST = "manifest.json"


class EngineError(InputError):
    """An engine folder that cannot serve this run; the message names the command that fixes it."""


def _rebuild_hint(ckpt_dir, preset: Preset, shape: str | None, precision: str | None) -> str:
    args = f"CKPT={ckpt_dir}" + (f" PRESET={shape}" if shape else "") + (f" PRECISION={precision}" if precision else "")
    return f"run `make engines {args}`"


def default_folder(kind: str) -> Path:
    from flf2v.export.build import default_folder as build_default
    return build_default(kind)


def read_manifest(folder: Path, ckpt_dir, preset: Preset, kind: str) -> dict:
    from flf2v.export.build import checkpoint_fingerprint, target_tag
    path = folder / MANIFEST
    hint = _rebuild_hint(ckpt_dir, preset, None, None)
    if not path.is_file():
        raise EngineError(f"{folder}: no engines here ({MANIFEST} missing); {hint}")
    try:
        m = json.loads(path.read_text())
        engines, shape = m["engines"], m["shape"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise EngineError(f"{path}: unreadable manifest ({e!r}); {hint}") from None
    hint = _rebuild_hint(ckpt_dir, preset, shape.get("name"), m.get("precision"))
    if m.get("backend") != kind:
        raise EngineError(f"{folder} holds {m.get('backend')} engines, not {kind}; pass --backend "
                          f"{m.get('backend')} or {hint}")
    if m.get("model_preset") != preset.name:
        raise EngineError(f"{folder} was built for {m.get('model_preset')}, the checkpoint is {preset.name}; {hint}")
    if m.get("checkpoint", {}).get("fingerprint") != checkpoint_fingerprint(ckpt_dir):
        raise EngineError(f"{folder} was built from another checkpoint ({m.get('checkpoint', {}).get('dir')}); {hint}")
    if kind == "trt" and m.get("target") != target_tag("trt"):
        raise EngineError(f"{folder} was built for {m.get('target')}, this machine is {target_tag('trt')}; {hint}")
    for name, e in engines.items():
        for f, size in e.get("files", {}).items():
            p = folder / f
            if not p.is_file() or p.stat().st_size != size:
                raise EngineError(f"{p}: missing or damaged engine file ({name}); {hint}")
        if kind == "ort":
            check_external_data(folder / e["file"], folder)
    missing = [g for g in ("t5", "clip", "vae_encode_first", "vae_encode_chunk", "vae_decode_first",
                           "vae_decode_chunk") if g not in engines]
    if missing or not any(g.startswith("dit_b") for g in engines):
        raise EngineError(f"{folder}: incomplete build (missing {', '.join(missing) or 'dit'}); {hint}")
    return m


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
    """Shared logic; subclasses provide `_run(graph, inputs) -> outputs` (lists of tensors)."""
    capturable = False

    def __init__(self, folder, ckpt_dir, preset: Preset, device, kind: str):
        self.folder, self.preset, self.device = Path(folder), preset, torch.device(device)
        self.manifest = read_manifest(self.folder, ckpt_dir, preset, kind)
        s = self.manifest["shape"]
        self.video_shape = (s["height"], s["width"], s["frame_num"])
        self.specs = {g: e for g, e in self.manifest["engines"].items()}
        self.cfg_batches = tuple(int(g[-1]) for g in self.specs if g.startswith("dit_b"))

    def _zeros(self, graph: str, prefix: str) -> list[torch.Tensor]:
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        return [torch.zeros(s["shape"], dtype=dt[s["dtype"]], device=self.device)
                for s in self.specs[graph]["inputs"] if s["name"].startswith(prefix)]

    # -- the TorchBackend interface ------------------------------------------------------------------
    def encode_text(self, ids, mask):
        return self._run("t5", [ids, mask])[0]

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

    def _vae_step(self, kind: str):
        def step(x, caches, first):
            out = self._run(f"vae_{kind}_{'first' if first else 'chunk'}", [x.float(), *caches])
            return out[0].clone(), out[1:]  # clone: TensorRT reuses its output buffers on the next call
        return step

    def vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        caches = self._zeros("vae_encode_first", "cache_in.")
        return encode_chunks(self._vae_step("encode"), video, caches, self.preset.vae.stride[0])

    def vae_decode(self, z: torch.Tensor, progress=None) -> torch.Tensor:
        return decode_chunks(self._vae_step("decode"), z, self._zeros("vae_decode_first", "cache_in."), progress)


class OrtBackend(EngineBackend):
    name = "ort"

    def __init__(self, folder, ckpt_dir, preset, device="cpu", threads: int | None = None):
        super().__init__(folder, ckpt_dir, preset, device, "ort")
        import onnxruntime as ort
        self._ort = ort
        self.opts = ort.SessionOptions()
        self.opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning ORT threads keep the cores busy between calls and starve the torch ops in between
        # (measured on the 2-vCPU dev machine: tiny end to end 0.3 s -> 0.2 s).
        self.opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            self.opts.intra_op_num_threads = threads
        avail = ort.get_available_providers()
        self.providers = (["CUDAExecutionProvider"] if self.device.type == "cuda" and
                          "CUDAExecutionProvider" in avail else []) + ["CPUExecutionProvider"]
        self.sessions: dict = {}

    def session(self, graph: str):
        if graph not in self.sessions:
            path = self.folder / self.specs[graph]["file"]
            self.sessions[graph] = self._ort.InferenceSession(str(path), self.opts, providers=self.providers)
        return self.sessions[graph]

    def release_encoders(self) -> None:
        for g in ("t5", "clip", "vae_encode_first", "vae_encode_chunk"):
            self.sessions.pop(g, None)

    def _run(self, graph: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        spec = self.specs[graph]
        feeds = {s["name"]: np.ascontiguousarray(x.detach().cpu().numpy()) for s, x in zip(spec["inputs"], inputs)}
        outs = self.session(graph).run(None, feeds)
        return [torch.from_numpy(o).to(self.device) for o in outs]


class TrtBackend(EngineBackend):
    """TensorRT engines on static CUDA buffers bound once; enqueued on the current stream, so the
    denoising step can be captured in a CUDA graph. GPU-only: not exercised on a CPU machine."""
    name = "trt"
    capturable = True

    def __init__(self, folder, ckpt_dir, preset, device="cuda"):
        super().__init__(folder, ckpt_dir, preset, device, "trt")
        import tensorrt as trt
        if self.manifest.get("attention") == "plugin":  # DiT engines with the fused Triton attention plugins
            from flf2v.kernels.trt_plugin import register_plugins
            register_plugins()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines: dict = {}

    def _load(self, graph: str):
        if graph not in self.engines:
            engine = self.runtime.deserialize_cuda_engine((self.folder / self.specs[graph]["file"]).read_bytes())
            ctx = engine.create_execution_context()
            bufs = {}
            for s in self.specs[graph]["inputs"] + self.specs[graph]["outputs"]:
                dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64}[s["dtype"]]
                bufs[s["name"]] = torch.empty(s["shape"], dtype=dtype, device=self.device)
                ctx.set_tensor_address(s["name"], bufs[s["name"]].data_ptr())
            self.engines[graph] = (engine, ctx, bufs)
        return self.engines[graph]

    def release_encoders(self) -> None:
        for g in ("t5", "clip", "vae_encode_first", "vae_encode_chunk"):
            self.engines.pop(g, None)

    def _run(self, graph: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        _, ctx, bufs = self._load(graph)
        spec = self.specs[graph]
        for s, x in zip(spec["inputs"], inputs):
            if x.data_ptr() != bufs[s["name"]].data_ptr():
                bufs[s["name"]].copy_(x)
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue {graph}")
        return [bufs[s["name"]] for s in spec["outputs"]]


def open_backend(kind: str, folder, ckpt_dir, preset: Preset, device) -> EngineBackend:
    folder = Path(folder) if folder else default_folder(kind)
    if kind == "ort":
        return OrtBackend(folder, ckpt_dir, preset, device)
    if kind == "trt":
        if not torch.cuda.is_available():
            raise EngineError("--backend trt needs a CUDA GPU; use --backend ort or torch here")
        return TrtBackend(folder, ckpt_dir, preset, device)
    raise EngineError(f"unknown backend {kind!r}; choose torch, ort or trt")
