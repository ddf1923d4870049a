"""The `aoti` backend: the AOTInductor packages (`.pt2`, export/aoti.py) of one `flf2v-build --backend aoti`
folder behind the backend contract (runtime/backend.py).

Each package is loaded when first used (`torch._inductor.aoti_load_package`: compiled C++ / Triton code and
the weights, no Python model code) and called with the graph's inputs in contract order. Outputs are the
package's own tensors (fresh each call), so the denoiser contract of runtime/denoise.py holds trivially and
the VAE caches pass from step to step as they come back. The manifest's target tag names the device
architecture and torch version the packages were compiled for; another one is refused (export/manifest.py)
with the `make engines ... BACKEND=aoti` command, and so is a package that does not load. On CUDA the
denoising step is captured as a CUDA graph around the package calls (UNVERIFIED: no GPU here).

A folder built with STREAM=1 (export/aoti_stream.py) holds each DiT step as embed, block and head
packages; the block weights are loaded from the checkpoint here, as the run's memory plan keeps them:
all on the device, or `resident_blocks` of them with the rest streamed from host memory through two
device slots (runtime/offload.py).
"""
from __future__ import annotations

import torch

from flf2v.export.contracts import TORCH_DTYPES
from flf2v.export.manifest import EngineError

from flf2v.log import logger

from .engine_backend import DECODER_GRAPHS, ENCODER_GRAPHS, EngineBackend


class AotiBackend(EngineBackend):
    name = "aoti"

    def __init__(self, folder, ckpt_dir, preset, device="cpu", loras=(), resident_blocks: int | None = None):
        super().__init__(folder, ckpt_dir, preset, device, "aoti", loras)
        if resident_blocks is not None and not self.manifest.get("weight_streaming"):
            raise EngineError(f"{self.folder} holds whole-DiT packages, which cannot stream blocks; rebuild with "
                              f"flf2v-build --backend aoti --weight_streaming, or drop --offload blocks")
        if self.lora_swap:  # the weights are compiled into the packages
            from flf2v.export import manifest as M

            from . import loras as L
            raise L.refuse(self.folder, self.manifest, self.loras, "AOTInductor packages",
                           M.hint_for(self.manifest, ckpt_dir, None, loras=L.lora_arg(self.loras)))
        built_on = torch.device(next(iter(self.manifest["engines"].values()))["builder"].get("device", "cpu"))
        if built_on.type != self.device.type:
            raise EngineError(f"{self.folder} holds AOTInductor packages compiled for {built_on.type}, this run is "
                              f"on {self.device.type}; pass --device {built_on.type}, or {self.hint}")
        if self.manifest.get("attention") in ("plugin", "sage"):
            # the kernels are compiled into the DiT packages; registering the ops too keeps a package that
            # kept them as op calls loadable
            import flf2v.kernels.ops  # noqa: F401
        # streamed blocks are copied on a side stream between package calls: not captured (unverified there)
        self.capturable = self.device.type == "cuda" and not self.manifest.get("weight_streaming")
        self.resident_blocks, self.blocks = resident_blocks, None  # the DiT blocks' weights (streamed folders)
        self.models: dict = {}
        self.loads: dict[str, int] = {}  # graph -> the number of its package's load (graph_token)
        self._load_count = 0

    def model(self, graph: str, part: str | None = None):
        """The loaded package of `graph` (of its `part` in a streamed folder)."""
        key = f"{graph}.{part}" if part else graph
        if key not in self.models:
            path = self.folder / (self.specs[graph]["parts"][part] if part else self.specs[graph]["file"])
            logger.debug("loading %s", path)
            self.unchanged(graph)
            try:
                # run_single_threaded: by the audit of torch 2.13's AOTI runtime (unverified on a GPU), the
                # default container queries CUDA events on each run, illegal inside a CUDA-graph capture
                self.models[key] = torch._inductor.aoti_load_package(
                    str(path), run_single_threaded=self.capturable,
                    device_index=self.device.index if self.device.index is not None else -1)
                self._load_count += 1
                self.loads[key] = self._load_count
            except Exception as e:  # the loader raises RuntimeError, zipfile and OS errors alike
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise EngineError(f"{path}: not a loadable AOTInductor package ({type(e).__name__}: "
                                  f"{msg[:160]}); {self.hint}") from None
        return self.models[key]

    def _run(self, graph: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        ins, _ = self.io(graph)
        args = []
        for s, x in zip(ins, inputs):
            x = x.detach().to(self.device, TORCH_DTYPES[s["dtype"]]).contiguous()
            if list(x.shape) != list(s["shape"]):
                raise ValueError(f"{graph}: input {s['name']} has shape {tuple(x.shape)}, the package takes "
                                 f"{tuple(s['shape'])}")
            args.append(x)
        if "parts" in self.specs[graph]:
            return self._streamed(graph, args)
        out = self.model(graph)(*args)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def _streamed(self, graph: str, args: list[torch.Tensor]) -> list[torch.Tensor]:
        """A DiT step of a streamed folder: embed, each block with its weights, head; (v, hidden)."""
        from flf2v.export.aoti_stream import PARTS

        from .offload import block_tensors
        embed, step, head = (self.model(graph, p) for p in PARTS)
        h, e, e0, txt, img, cos, sin = embed(*args)
        x = h.flatten(1, 3)
        for block in self.dit_blocks():
            x = step(x, e0, txt, img, cos, sin, *block_tensors(block))  # the module's pytree: one tensor
        hidden = x.view(h.shape)
        v = head(hidden, e)
        return [v, hidden]

    def dit_blocks(self):
        """The DiT blocks' weights, read from the checkpoint once (the run's LoRAs are the folder's): on the
        device, or `resident_blocks` of them there and the rest streamed (runtime/offload.StreamedBlocks)."""
        if self.blocks is None:
            from flf2v.export.contracts import COMPUTE_DTYPE
            from flf2v.models.lora import load_dit

            from .memory_plan import PINNED_SHARE, host_memory
            from .offload import StreamedBlocks
            blocks = load_dit(self.ckpt_dir, COMPUTE_DTYPE[self.manifest["precision"]], self.preset, self.loras,
                              blocks_only=True, quant=self.quant)
            self.blocks = blocks.to(self.device) if self.resident_blocks is None else StreamedBlocks(
                blocks, self.resident_blocks, self.device, int(PINNED_SHARE * host_memory()))
        return self.blocks

    def graph_token(self, cfg_batch: int):
        """The loads of the DiT packages a CUDA graph captured now would call (None before they are loaded):
        a graph captured over one load holds that package's memory and must not replay over another."""
        loaded = [g for g in (f"dit_b{cfg_batch}", f"dit_cached_b{cfg_batch}") if g in self.models]
        return tuple(self.loads[g] for g in loaded) or None

    def finish_denoise(self) -> None:  # the DiT packages go before VAE decode (as TensorRT's engines)
        for g in [g for g in self.models if g.startswith("dit_")]:
            self.models.pop(g)
        if self.device.type == "cuda":
            if self.blocks is not None:  # and the blocks' weights (to host memory, for the next run)
                self.blocks.to("cpu")
            torch.cuda.empty_cache()

    def release_encoders(self) -> None:
        for g in ENCODER_GRAPHS:
            self.models.pop(g, None)

    def prepare_denoise(self) -> None:  # only the DiT stays loaded for the loop (as TensorRT)
        for g in ENCODER_GRAPHS + DECODER_GRAPHS:
            self.models.pop(g, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            if self.blocks is not None:
                self.blocks.to(self.device)
