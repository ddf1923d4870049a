"""The FLF2V / I2V generation pipeline, one code path for every backend.

preprocess -> T5 (prompt + negative prompt) -> CLIP (first [+ last] frame) -> VAE encode of the
condition -> flow-matching loop with classifier-free guidance -> VAE decode. Two bugs of the official
`first_last_frame2video.py` are fixed here (see README, "Differences from the official code"):
the last frame is resized to the output size like the first (the official code center-crops it with
width and height swapped when the sizes differ), and the mask is built for any frame_num = 4n+1 (the
official one is hard-coded to 81 frames).
"""
from __future__ import annotations

import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from flf2v.models.clip import preprocess as clip_preprocess
from flf2v.models.config import Preset

from .denoise import DenoiseLoop
from .media import InputError, image_to_tensor
from .scheduler import make_sampler

# The official default negative prompt (wan/configs/shared_config.py), used when none is given.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


@dataclass
class StageTimes:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str, device: torch.device | None = None):
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        yield
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def parse_size(size: str, preset: Preset) -> tuple[int, int]:
    """'W*H' (the official --size spelling) -> (W, H), only among the preset's sizes."""
    if size not in preset.sizes:
        raise InputError(f"--size {size} is not supported by {preset.name}; choose one of "
                         f"{', '.join(preset.sizes)}")
    w, h = (int(v) for v in size.split("*"))
    return w, h


def latent_grid(img_hw: tuple[int, int], max_area: int, stride: int, patch: int) -> tuple[int, int]:
    """Official sizing: keep the first frame's aspect ratio within max_area, multiple of stride*patch."""
    h, w = img_hw
    aspect = h / w
    lat_h = round(math.sqrt(max_area * aspect) // stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect) // stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise InputError(f"a {w}x{h} frame is too elongated for max area {max_area}; crop it closer to the "
                         f"output aspect ratio")
    return lat_h, lat_w


def check_frame_num(frame_num: int, max_latent_frames: int) -> int:
    if not isinstance(frame_num, int) or frame_num < 5 or (frame_num - 1) % 4:
        raise InputError(f"--frame_num {frame_num} is not of the form 4n+1 with n >= 1; use e.g. 81")
    if (frame_num - 1) // 4 + 1 > max_latent_frames:
        raise InputError(f"--frame_num {frame_num} is over the model's {4 * (max_latent_frames - 1) + 1} "
                         f"frame limit")
    return frame_num


def condition_mask(frame_num: int, lat_h: int, lat_w: int, last_frame: bool) -> torch.Tensor:
    """[4, T_lat, lat_h, lat_w]: 1 where a pixel frame is given (first, and last for FLF2V)."""
    m = torch.ones(1, frame_num, lat_h, lat_w)
    m[:, 1:-1 if last_frame else None] = 0
    m = torch.cat([m[:, :1].repeat_interleave(4, dim=1), m[:, 1:]], dim=1)
    return m.view(1, m.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)[0]


def resize(frame: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(frame[None], size=(h, w), mode="bicubic", align_corners=False)[0]


class Pipeline:
    """`Pipeline(backend, tokenizer, preset).generate(prompt, first, last)` -> [3, F, H, W] in [-1, 1]."""

    def __init__(self, backend, tokenizer, preset: Preset, device: str | torch.device = "cpu"):
        self.backend, self.tokenizer, self.preset = backend, tokenizer, preset
        self.device = torch.device(device)
        self.times = StageTimes()

    @classmethod
    def from_checkpoint(cls, ckpt_dir, dtype=torch.float32, device="cpu", **kw) -> "Pipeline":
        from flf2v.models import checkpoint as ck

        from .torch_backend import TorchBackend
        preset = ck.preset_for(ckpt_dir)
        backend = TorchBackend(ckpt_dir, preset, dtype, device, **kw)
        return cls(backend, ck.load_tokenizer(ckpt_dir, preset), preset, device)

    @classmethod
    def from_engines(cls, folder, ckpt_dir=None, device=None) -> "Pipeline":
        """Engines of a `flf2v-build` folder; the tokenizer (and fingerprint check) from `ckpt_dir`,
        by default the checkpoint the folder was built from."""
        from flf2v.models import checkpoint as ck

        from .engines import MANIFEST, EngineError, open_backend
        try:
            m = json.loads((Path(folder) / MANIFEST).read_text())
            kind, ckpt_dir = m["backend"], ckpt_dir or m["checkpoint"]["dir"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise EngineError(f"{folder}: not an engine folder ({e!r}); build one with `make engines`") from None
        device = torch.device(device or ("cuda" if kind == "trt" else "cpu"))
        preset = ck.preset_for(ckpt_dir)
        return cls(open_backend(kind, folder, ckpt_dir, preset, device), ck.load_tokenizer(ckpt_dir, preset),
                   preset, device)

    # -----------------------------------------------------------------------------------------------
    def generate(self, prompt: str, first_frame: Image.Image, last_frame: Image.Image | None = None, *,
                 size: str | None = None, frame_num: int | None = None, sample_solver: str = "unipc",
                 sample_steps: int | None = None, sample_shift: float | None = None,
                 guide_scale: float | None = None, seed: int = -1, negative_prompt: str = "",
                 cfg_batch: int = 2, progress: bool = True) -> torch.Tensor:
        p, dev, times = self.preset, self.device, self.times
        times.seconds.clear()
        flf2v = p.dit.model_type == "flf2v"
        if flf2v and last_frame is None:
            raise InputError(f"{p.name} needs a last frame; pass --last_frame")
        if not flf2v and last_frame is not None:
            raise InputError(f"{p.name} is image-to-video and takes no last frame; drop --last_frame")
        fixed = getattr(self.backend, "video_shape", None)  # engines are built for one (H, W, frames)
        if frame_num is None:
            frame_num = fixed[2] if fixed else p.frame_num
        frame_num = check_frame_num(frame_num, p.dit.rope_max_pos)
        steps = p.sample_steps if sample_steps is None else sample_steps
        shift = p.sample_shift if sample_shift is None else sample_shift
        guide = p.sample_guide_scale if guide_scale is None else guide_scale
        if not math.isfinite(guide):
            raise InputError(f"--sample_guide_scale {guide} is not a finite number")
        w_max, h_max = parse_size(size or (f"{fixed[1]}*{fixed[0]}" if fixed else p.default_size), p)
        batches = getattr(self.backend, "cfg_batches", (1, 2))  # engines may hold only one CFG layout
        if cfg_batch not in batches:
            cfg_batch = batches[0]
        self.seed = seed = random.randint(0, 2**63 - 1) if seed < 0 else seed
        sampler = make_sampler(sample_solver, steps, shift)

        with times("preprocess"):
            first = image_to_tensor(first_frame)
            lat_h, lat_w = latent_grid(first.shape[1:], w_max * h_max, p.vae.stride[1], p.dit.patch_size[1])
            h, w = lat_h * p.vae.stride[1], lat_w * p.vae.stride[2]
            if fixed and (h, w, frame_num) != tuple(fixed):
                raise InputError(f"the engines were built for {fixed[1]}x{fixed[0]}, {fixed[2]} frames, but this "
                                 f"run needs {w}x{h}, {frame_num} frames (from --size, --frame_num and the first "
                                 f"frame's aspect ratio); build matching engines with `make engines` or use "
                                 f"--backend torch")
            frames = [first] + ([image_to_tensor(last_frame)] if flf2v else [])
            t_lat = (frame_num - 1) // p.vae.stride[0] + 1
            # Noise is drawn on the CPU so a seed gives the same video on every device (the official
            # code draws it on the GPU).
            noise = torch.randn(1, p.vae.z_dim, t_lat, lat_h, lat_w, dtype=torch.float32,
                                generator=torch.Generator().manual_seed(seed))
            ids, mask = self.tokenizer([prompt, negative_prompt or DEFAULT_NEGATIVE_PROMPT])
            pixels = torch.cat([clip_preprocess(f[None], p.clip) for f in frames])
            sized = [resize(f, h, w) for f in frames]  # the official bug fix: last frame resized too
            cond = torch.zeros(3, frame_num, h, w)
            cond[:, 0] = sized[0]
            if flf2v:
                cond[:, -1] = sized[1]
            msk = condition_mask(frame_num, lat_h, lat_w, flf2v)

        with times("text_encoder", dev):
            context = self.backend.encode_text(ids, mask).float()
        with times("image_encoder", dev):
            clip_fea = self.backend.encode_image(pixels).float().reshape(1, -1, p.clip.dim)
        with times("vae_encode", dev):
            y = torch.cat([msk[None].to(dev), self.backend.vae_encode(cond[None]).to(dev)], dim=1)

        with times("denoise", dev):
            self.backend.prepare_denoise()
            latent = self.denoise(sampler, noise.to(dev), context.to(dev), clip_fea.to(dev), y, guide,
                                  cfg_batch, progress)
            self.backend.finish_denoise()
        with times("vae_decode", dev):
            bar = partial(tqdm, desc="decoding", unit="latent frame", disable=not progress, leave=False)
            video = self.backend.vae_decode(latent, bar)[0]
        return video

    # -----------------------------------------------------------------------------------------------
    def denoise(self, sampler, x, context, clip_fea, y, guide: float, cfg_batch: int, progress: bool):
        loop = DenoiseLoop(self.backend.denoise, sampler, x, context, clip_fea, y, guide, cfg_batch)
        if x.device.type == "cuda" and getattr(self.backend, "capturable", False):
            loop.capture()
        with tqdm(total=loop.steps, desc="denoising", disable=not progress, leave=False) as bar:
            return loop.run(bar)
