"""The `torch` backend: the PyTorch reference networks loaded from an official checkpoint.

It is the ground truth the engine backends are compared with, and a usable runtime in its own right
(optionally with the fused Triton attention on a GPU: `attention="triton"`).
"""
from __future__ import annotations

import torch

from flf2v.models import checkpoint as ck
from flf2v.models.config import Preset


class TorchBackend:
    name = "torch"
    capturable = True  # the whole denoising step can be recorded as one CUDA graph

    def __init__(self, ckpt_dir, preset: Preset | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", attention: str = "sdpa", offload_model: bool = False,
                 loras=None):
        self.preset = preset or ck.preset_for(ckpt_dir)
        self.ckpt_dir, self.dtype, self.device = ckpt_dir, dtype, torch.device(device)
        self.offload_model = offload_model
        self._placements = 0  # counts the DiT's moves to the device: a captured CUDA graph reads its weights there
        # Encoders are loaded when first used and dropped once the denoiser needs the memory.
        self._t5 = self._clip = None
        self.vae = ck.load_vae(ckpt_dir, dtype, self.preset).to(self.device)
        self.loras = list(loras or [])  # [(models.lora.LoRA, scale)], merged into the DiT's weights
        self.dit = ck.load_dit(ckpt_dir, dtype, self.preset, attention=attention, loras=self.loras)
        if not offload_model:
            self.dit.to(self.device)

    # -- encoders ------------------------------------------------------------------------------------
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._t5 is None:
            self._t5 = ck.load_t5(self.ckpt_dir, self.dtype, self.preset).to(self.device)
        return self._t5(ids.to(self.device), mask.to(self.device))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._clip is None:
            self._clip = ck.load_clip(self.ckpt_dir, self.dtype, self.preset).to(self.device)
        return self._clip(pixels.to(self.device, self.dtype))

    def release_encoders(self) -> None:
        self._t5 = self._clip = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- VAE -----------------------------------------------------------------------------------------
    def vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(video.to(self.device, self.dtype)).float()

    def vae_decode(self, z: torch.Tensor, progress=None) -> torch.Tensor:
        return self.vae.decode(z.to(self.device, self.dtype), progress).float()

    # -- denoiser ------------------------------------------------------------------------------------
    def prepare_denoise(self) -> None:
        """Called once before the loop: `--offload_model` keeps the DiT on the host until now."""
        if self.offload_model:
            self.release_encoders()
            self.dit.to(self.device)
            self._placements += 1

    def graph_token(self, cfg_batch: int) -> int:
        """Changes whenever the DiT's weights may have moved: a CUDA graph captured under another token
        must not be replayed (runtime/pipeline.py keeps captured graphs per shape)."""
        return self._placements

    def finish_denoise(self) -> None:
        if self.offload_model and self.device.type == "cuda":
            self.dit.to("cpu")
            torch.cuda.empty_cache()

    def denoise(self, x, t, context, clip_fea, y) -> torch.Tensor:
        d = self.dtype
        return self.dit(x.to(d), t, context.to(d), clip_fea.to(d), y.to(d))

    # the step cache's two forms (runtime/cache.py): full with the blocks' output, and the one skipping them
    steps_cache = True

    def denoise_full(self, x, t, context, clip_fea, y) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dtype
        return self.dit(x.to(d), t, context.to(d), clip_fea.to(d), y.to(d), return_hidden=True)

    def denoise_cached(self, x, x_prev, t, y, hidden) -> torch.Tensor:
        d = self.dtype
        return self.dit.forward_cached(x.to(d), x_prev.to(d), t, y.to(d), hidden)
