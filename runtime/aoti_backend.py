"""The `aoti` backend: the AOTInductor packages (`.pt2`, export/aoti.py) of one `flf2v-build --backend aoti`
folder behind the backend contract (runtime/backend.py).

Each package is loaded when first used (`torch._inductor.aoti_load_package`: compiled C++ / Triton code and
the weights, no Python model code) and called with the graph's inputs in contract order. Outputs are the
package's own tensors (fresh each call), so the denoiser contract of runtime/denoise.py holds trivially and
the VAE caches pass from step to step as they come back. The manifest's target tag names the device
architecture and torch version the packages were compiled for; another one is refused (export/manifest.py)
with the `make engines ... BACKEND=aoti` command, and so is a package that does not load. On CUDA the
denoising step is captured as a CUDA graph around the package calls (UNVERIFIED: no GPU here).
"""
from __future__ import annotations

import torch

from flf2v.export.contracts import TORCH_DTYPES
from flf2v.export.manifest import EngineError

from flf2v.log import logger

from .engine_backend import DECODER_GRAPHS, ENCODER_GRAPHS, EngineBackend


class AotiBackend(EngineBackend):
    name = "aoti"

    def __init__(self, folder, ckpt_dir, preset, device="cpu", loras=()):
        super().__init__(folder, ckpt_dir, preset, device, "aoti", loras)
        if self.lora_swap:  # the weights are compiled into the packages
            from flf2v.export import manifest as M

            from . import loras as L
            raise L.refuse(self.folder, self.manifest, self.loras, "AOTInductor packages", M.rebuild_hint(
                ckpt_dir, None, self.shape.name, self.manifest.get("precision"), self.manifest.get("attention"),
                loras=L.lora_arg(self.loras), backend="aoti", quant=self.quant))
        built_on = torch.device(next(iter(self.manifest["engines"].values()))["builder"].get("device", "cpu"))
        if built_on.type != self.device.type:
            raise EngineError(f"{self.folder} holds AOTInductor packages compiled for {built_on.type}, this run is "
                              f"on {self.device.type}; pass --device {built_on.type}, or {self.hint}")
        if self.manifest.get("attention") in ("plugin", "sage"):
            # the kernels are compiled into the DiT packages; registering the ops too keeps a package that
            # kept them as op calls loadable
            import flf2v.kernels.ops  # noqa: F401
        self.capturable = self.device.type == "cuda"
        self.models: dict = {}
        self.loads: dict[str, int] = {}  # graph -> the number of its package's load (graph_token)
        self._load_count = 0

    def model(self, graph: str):
        if graph not in self.models:
            path = self.folder / self.specs[graph]["file"]
            logger.debug("loading %s", path)
            try:
                # run_single_threaded: by the audit of torch 2.13's AOTI runtime (unverified on a GPU), the
                # default container queries CUDA events on each run, illegal inside a CUDA-graph capture
                self.models[graph] = torch._inductor.aoti_load_package(
                    str(path), run_single_threaded=self.capturable,
                    device_index=self.device.index if self.device.index is not None else -1)
                self._load_count += 1
                self.loads[graph] = self._load_count
            except Exception as e:  # the loader raises RuntimeError, zipfile and OS errors alike
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise EngineError(f"{path}: not a loadable AOTInductor package ({type(e).__name__}: "
                                  f"{msg[:160]}); {self.hint}") from None
        return self.models[graph]

    def _run(self, graph: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        ins, _ = self.io(graph)
        args = []
        for s, x in zip(ins, inputs):
            x = x.detach().to(self.device, TORCH_DTYPES[s["dtype"]]).contiguous()
            if list(x.shape) != list(s["shape"]):
                raise ValueError(f"{graph}: input {s['name']} has shape {tuple(x.shape)}, the package takes "
                                 f"{tuple(s['shape'])}")
            args.append(x)
        out = self.model(graph)(*args)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def graph_token(self, cfg_batch: int):
        """The loads of the DiT packages a CUDA graph captured now would call (None before they are loaded):
        a graph captured over one load holds that package's memory and must not replay over another."""
        loaded = [g for g in (f"dit_b{cfg_batch}", f"dit_cached_b{cfg_batch}") if g in self.models]
        return tuple(self.loads[g] for g in loaded) or None

    def finish_denoise(self) -> None:  # the DiT packages go before VAE decode (as TensorRT's engines)
        for g in [g for g in self.models if g.startswith("dit_")]:
            self.models.pop(g)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def release_encoders(self) -> None:
        for g in ENCODER_GRAPHS:
            self.models.pop(g, None)

    def prepare_denoise(self) -> None:  # only the DiT stays loaded for the loop (as TensorRT)
        for g in ENCODER_GRAPHS + DECODER_GRAPHS:
            self.models.pop(g, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
