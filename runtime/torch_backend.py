"""The `torch` backend: the PyTorch reference networks loaded from an official checkpoint.

It is the ground truth the engine backends are compared with, and a usable runtime in its own right
(optionally with the fused Triton attention on a GPU: `attention="triton"`).
"""
from __future__ import annotations

import torch

from flf2v.log import logger
from flf2v.models import checkpoint as ck
from flf2v.models.clip import run_dtype as clip_run_dtype
from flf2v.models.lora import load_dit
from flf2v.models.config import Preset


class TorchBackend:
    """The backend contract (runtime/backend.py) on the reference networks. Results are fresh tensors, so
    the aliasing rule holds trivially."""
    name = "torch"
    capturable = True  # the whole denoising step can be recorded as one CUDA graph
    # no engine folder: nothing to rebuild, any video shape, both CFG layouts, the step cache's two forms
    folder = manifest = hint = video_shape = None
    cfg_batches = (1, 2)
    steps_cache = True

    def __init__(self, ckpt_dir, preset: Preset | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", attention: str = "sdpa", offload_model: bool | None = None,
                 loras=None, parallel=None, dit_fsdp: bool = False, t5_fsdp: bool = False, quant: str = "none",
                 plan=None):
        """`parallel` (runtime/parallel.py): this rank's groups in a torchrun job; the DiT runs Ulysses over
        its sequence-parallel group, and `dit_fsdp` / `t5_fsdp` shard those weights over all ranks.
        `quant` "fp8": the DiT's block linears in FP8 (models/quant.py), quantized as the weights stream in.
        `offload_model` (default: on CUDA, unless sharded): the DiT on the device only for the loop, as the
        official --offload_model; on CUDA the encoders are released before the loop either way.
        `plan` (runtime/memory_plan.py Plan): its offload_model, t5_cpu (T5 runs on the CPU), blocks (all but
        that many DiT blocks streamed from host memory, runtime/offload.py) and vae_tile; T5 and CLIP are
        released as soon as they have run."""
        self.plan = plan
        if plan is not None:
            offload_model = plan.offload_model
        self.preset = preset or ck.preset_for(ckpt_dir)
        self.ckpt_dir, self.dtype, self.device = ckpt_dir, dtype, torch.device(device)
        if offload_model is None:
            offload_model = self.device.type == "cuda" and not dit_fsdp
        self.offload_model = offload_model
        self.parallel, self.dit_fsdp, self.t5_fsdp = parallel, dit_fsdp, t5_fsdp
        if (dit_fsdp or t5_fsdp) and parallel is None:
            raise ValueError("dit_fsdp / t5_fsdp shard weights over the ranks of a torchrun job: needs `parallel`")
        if dit_fsdp and quant != "none":
            raise ValueError("dit_fsdp shards the checkpoint's weights as stored; run --quant fp8 without it")
        self.quant = quant
        if dit_fsdp and (loras or offload_model):
            raise ValueError("dit_fsdp loads each rank's shard of the checkpoint: without LoRAs and offload_model")
        self._dit_placed = not offload_model  # on the device (device_bytes)
        self._placements = 0  # counts the DiT's moves to the device: a captured CUDA graph reads its weights there
        # Encoders are loaded when first used and dropped once the denoiser needs the memory.
        self._t5 = self._clip = None
        self.vae = ck.load_vae(ckpt_dir, dtype, self.preset).to(self.device)
        self.loras = list(loras or [])  # [(models.lora.LoRA, scale)], merged into the DiT's weights
        if dit_fsdp:
            from flf2v.models.sharded import load_sharded
            self.dit = load_sharded(ckpt_dir, "dit", dtype, self.preset, parallel.mesh, self.device,
                                    attention=attention)
            self.capturable = False  # FSDP2's all-gathers run outside a CUDA graph (models/sharded.py)
        else:
            self.dit = load_dit(ckpt_dir, dtype, self.preset, self.loras, attention=attention, quant=quant)
            if not offload_model and (plan is None or plan.blocks is None):  # streamed: only some blocks go
                self.dit.to(self.device)
        self.streamed = None
        if plan is not None and plan.blocks is not None:
            from .memory_plan import PINNED_SHARE, host_memory
            from .offload import stream_blocks
            # offloaded: the resident part reaches the device in prepare_denoise, not now and back again
            self.streamed = stream_blocks(self.dit, plan.blocks, self.device, int(PINNED_SHARE * host_memory()),
                                          place=not offload_model)
            self.capturable = False  # the copies are ordered by events set from Python, per call
        if parallel is not None and parallel.sp is not None:
            parallel.sp.check_heads(self.preset.dit.num_heads)
            self.dit.sp = parallel.sp

    # -- video shape: the networks run at any grid and frame count -----------------------------------
    def check_video(self, height: int, width: int, frame_num: int) -> None:
        return None

    def set_video(self, height: int, width: int, frame_num: int) -> None:
        pass

    # -- encoders ------------------------------------------------------------------------------------
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._t5 is None and self.t5_fsdp:
            from flf2v.models.sharded import load_sharded
            self._t5 = load_sharded(self.ckpt_dir, "t5", self.dtype, self.preset, self.parallel.mesh, self.device)
        elif self._t5 is None:
            logger.debug("loading T5 from %s", self.ckpt_dir)
            self._t5 = ck.load_t5(self.ckpt_dir, self.dtype, self.preset).to(self._t5_device)
        out = self._t5(ids.to(self._t5_device), mask.to(self._t5_device)).to(self.device)
        if self.plan is not None:  # a plan counts T5 on the device only while it runs
            self._t5 = None
        return out

    @property
    def _t5_device(self) -> torch.device:
        return torch.device("cpu") if self.plan is not None and self.plan.t5_cpu else self.device

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = clip_run_dtype(self.dtype)
        if self._clip is None:
            logger.debug("loading CLIP from %s", self.ckpt_dir)
            self._clip = ck.load_clip(self.ckpt_dir, dtype, self.preset).to(self.device)
        out = self._clip(pixels.to(self.device, dtype))
        if self.plan is not None:
            self._clip = None
        return out

    def release_encoders(self) -> None:
        self._t5 = self._clip = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- VAE -----------------------------------------------------------------------------------------
    def vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(video.to(self.device, self.dtype)).float()

    def vae_decode(self, z: torch.Tensor, progress=None) -> torch.Tensor:
        tile = self.plan.vae_tile if self.plan is not None else None
        return self.vae.decode(z.to(self.device, self.dtype), progress, tile=tile).float()

    # -- denoiser ------------------------------------------------------------------------------------
    def prepare_denoise(self) -> None:
        """Called once before the loop: `--offload_model` keeps the DiT on the host until now; on CUDA the
        encoders (T5 and CLIP: 12.7 GB of bf16 weights) give their memory back to the loop."""
        if self.dit_fsdp or self.offload_model or self.device.type == "cuda":
            self.release_encoders()
        if self.offload_model:
            self.dit.to(self.device)
            self._placements += 1
            self._dit_placed = True

    def graph_token(self, cfg_batch: int) -> int:
        """Changes whenever the DiT's weights may have moved: a CUDA graph captured under another token
        must not be replayed (runtime/pipeline.py keeps captured graphs per shape)."""
        return self._placements

    def finish_denoise(self) -> None:
        if self.offload_model:
            self._dit_placed = False
        if self.offload_model and self.device.type == "cuda":
            self.dit.to("cpu")
            self._placements += 1  # a graph captured over the weights' old place is stale from here
            torch.cuda.empty_cache()

    def device_bytes(self) -> dict[str, int]:
        """Bytes of weights (state dicts) this backend holds on its compute device now, by network: what a
        memory plan counts (runtime/memory_plan.py stage_weights). On a CPU, where host and device are one
        memory, those the plan keeps on the device: T5 unless t5_cpu, the DiT but in offload's host time, and
        of a streamed DiT the resident blocks and the two slots (its host copies are no module's state)."""
        def size(m):
            return sum(t.nbytes for t in m.state_dict().values()) if m is not None else 0
        t5_here = self.plan is None or not self.plan.t5_cpu
        return {"t5": size(self._t5) if t5_here else 0, "clip": size(self._clip), "vae": size(self.vae),
                "dit": size(self.dit) if self._dit_placed else 0}

    def denoise(self, x, t, context, clip_fea, y) -> torch.Tensor:
        d = self.dtype
        return self.dit(x.to(d), t, context.to(d), clip_fea.to(d), y.to(d))

    # the step cache's two forms (runtime/cache.py): full with the blocks' output, and the one skipping them
    def denoise_full(self, x, t, context, clip_fea, y) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dtype
        return self.dit(x.to(d), t, context.to(d), clip_fea.to(d), y.to(d), return_hidden=True)

    def denoise_cached(self, x, x_prev, t, y, hidden) -> torch.Tensor:
        d = self.dtype
        return self.dit.forward_cached(x.to(d), x_prev.to(d), t, y.to(d), hidden)
