"""The backend contract: what the pipeline (runtime/pipeline.py), the denoising loop (runtime/denoise.py), the
step-cache calibration (runtime/calibrate_cache.py) and `flf2v-run` (runtime/cli.py, runtime/choose.py) use
of a backend, and all of it. Every backend implements every member, with the value that says "nothing here"
where it has nothing (the torch backend has no engine folder, no fixed video shape, no manifest), so callers
never probe.

Implementations: TorchBackend (runtime/torch_backend.py) and the engine backends, EngineBackend
(runtime/engine_backend.py) and its OrtBackend, TrtBackend and AotiBackend.

Aliasing: a network call's result may be a buffer the backend owns and overwrites on the next call of the
same graph (TensorRT and ONNX Runtime bind one static output buffer per engine), so it is valid only until
that next call, e.g. a `denoise` result until the next `denoise` at that batch; a caller that keeps one
across such a call copies it first (the loop keeps the cond velocity of the batch-1 CFG layout this way).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Backend(Protocol):
    """The networks of one model behind one interface; see the module docstring for the aliasing rule."""

    name: str
    """The `--backend` name: "torch", "ort", "trt" or "aoti"."""
    ckpt_dir: str | Path
    """The checkpoint folder the weights come from (the step cache's calibration is looked up beside it)."""
    folder: Path | None
    """The engine folder the graphs come from; None for the torch backend."""
    manifest: dict | None
    """The engine folder's manifest (export/manifest.py); None for the torch backend."""
    hint: str | None
    """The command that rebuilds this backend's engines (said with errors the engines cause); None for torch."""
    video_shape: tuple[int, int, int] | None
    """(height, width, frames) a static engine folder serves, the default of a run; None: any shape."""
    cfg_batches: tuple[int, ...]
    """The DiT batches `denoise` takes, a subset of (1, 2) (engines may hold one layout only)."""
    capturable: bool
    """Whether the denoising step may be recorded as one CUDA graph around this backend's calls."""
    steps_cache: bool
    """Whether `denoise_full` and `denoise_cached` (the step cache's two DiT forms) can run."""
    quant: str
    """The DiT's block linears: "none" (the run's precision) or "fp8" (models/quant.py)."""
    loras: list
    """[(models.lora.LoRA, scale)] applied to the DiT (merged, built in or swapped in); [] for none."""

    def check_video(self, height: int, width: int, frame_num: int) -> int | None:
        """EngineError naming the build that serves it unless this backend runs that video shape; else the
        engines' optimization profile for it (None: the torch backend runs any shape)."""

    def set_video(self, height: int, width: int, frame_num: int) -> None:
        """Fix the video shape of the next calls (checked as by `check_video`)."""

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """T5: token ids and mask [B, L] -> context [B, L, text_dim] (B 1: the prompt, 2: and the negative)."""

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP: preprocessed frames [N, 3, 224, 224] -> features [N, tokens, clip_dim]."""

    def vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        """VAE encoder: pixels [1, 3, F, H, W] in [-1, 1] -> latents [1, 16, T_lat, h, w] fp32."""

    def vae_decode(self, z: torch.Tensor, progress=None) -> torch.Tensor:
        """VAE decoder: latents [1, 16, T_lat, h, w] -> pixels [1, 3, F, H, W] fp32; `progress` wraps the chunks."""

    def release_encoders(self) -> None:
        """Free T5, CLIP and the VAE encoder (they load again when next used)."""

    def prepare_denoise(self) -> None:
        """Called once before the loop: make room for the DiT and put it where the loop runs."""

    def denoise(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        """The DiT: the velocity [B, 16, T_lat, h, w] at latents x and timesteps t [B]; B in `cfg_batches`."""

    def denoise_full(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor,
                     y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(`denoise`'s velocity, the blocks' output `hidden`): a step the step cache may skip later."""

    def denoise_cached(self, x: torch.Tensor, x_prev: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                       hidden: torch.Tensor) -> torch.Tensor:
        """The velocity of a skipped step: embeddings and head on the last full step's `hidden`."""

    def finish_denoise(self) -> None:
        """Called once after the loop: give back what the DiT holds if the decoder needs the room."""

    def graph_token(self, cfg_batch: int) -> object:
        """A hashable naming the DiT memory a CUDA graph captured now would read (None: nothing to capture
        over); a graph captured under another token must not be replayed."""

