"""The FLF2V / I2V generation pipeline, one code path for every backend.

preprocess -> T5 (prompt + negative prompt) -> CLIP (first [+ last] frame) -> VAE encode of the
condition -> flow-matching loop with classifier-free guidance -> VAE decode. At guide scale 1 CFG is off
(cond + 1 * (cond - uncond) = cond): the negative prompt is not encoded and each step runs the DiT once.
Two bugs of the official `first_last_frame2video.py` are fixed here (see README, "Differences from the official code"):
the last frame is resized to the output size like the first (the official code center-crops it with
width and height swapped when the sizes differ), and the mask is built for any frame_num = 4n+1 (the
official one is hard-coded to 81 frames).
A run's settings are checked and resolved by runtime/request.py (`Request`).
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from flf2v.models.clip import preprocess as clip_preprocess
from flf2v.models.config import Preset
from flf2v.models.dit import ATTENTION_KINDS

from flf2v.log import logger

from . import cache as step_cache
from .backend import Backend
from .denoise import DenoiseLoop, NumericalError
from .media import InputError, as_image, image_to_tensor, warn_if_stretched, warn_if_upscaled
from .request import Request, check_names, make_request, run_options
from .scheduler import make_sampler

# TorchBackend's options that from_checkpoint passes on (its other arguments are from_checkpoint's own)
TORCH_OPTIONS = ("attention", "offload_model", "parallel", "dit_fsdp", "t5_fsdp", "quant", "plan")


def cuda_device_used(device: torch.device) -> int:
    """Bytes in use on the GPU, whoever allocated them (TensorRT's engines and contexts too)."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free


@dataclass
class StageTimes:
    seconds: dict[str, float] = field(default_factory=dict)
    device_used: dict[str, int] = field(default_factory=dict)  # CUDA: bytes in use at each stage's end

    @contextmanager
    def __call__(self, name: str, device: torch.device | None = None):
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(device)
            self.device_used[name] = max(self.device_used.get(name, 0), cuda_device_used(device))
        took = time.perf_counter() - t0
        self.seconds[name] = self.seconds.get(name, 0.0) + took
        logger.info("%s: %.2f s", name, took)


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

    def __init__(self, backend: Backend, tokenizer, preset: Preset, device: str | torch.device = "cpu",
                 cuda_graph: bool = True, parallel=None):
        """`backend`: the networks, any implementation of runtime/backend.py's contract. `parallel` (runtime/parallel.py): this rank's place in a torchrun job; the loop runs CFG-parallel
        over its CFG pair, and only rank 0 decodes (`generate` returns None on the others)."""
        self.backend, self.tokenizer, self.preset = backend, tokenizer, preset
        self.parallel = parallel
        self.device = torch.device(device)
        self.cuda_graph = cuda_graph  # False: the denoising step runs eagerly on CUDA too
        self.loops: OrderedDict = OrderedDict()  # kept denoising loops (see `denoise`)
        self.times = StageTimes()
        self.said: set[str] = set()  # warnings given once per pipeline
        self.last_cache: step_cache.CachePlan | None = None  # the last run's step-cache schedule
        self.last_request: Request | None = None  # the last run's settings, its seed the one it ran
        self.seed: int | None = None
        self.memory_plan = None  # runtime/memory_plan.py Plan the torch backend was opened with (flf2v-run)
        # one run at a time: the kept loops, the backends' bound buffers and the last_* records are the runs'
        # shared state (two threads' runs mixed each other's latents, silently)
        self.lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, ckpt_dir, dtype=torch.float32, device="cpu", cuda_graph: bool = True,
                        loras=(), **kw) -> "Pipeline":
        """The PyTorch reference networks of an official checkpoint folder.

        dtype       torch.float32 (the CPU's, and the parity reference) or torch.bfloat16 (CUDA)
        device      "cpu" or "cuda"; cuda_graph=False runs the denoising step eagerly on CUDA
        loras       [(path, scale)] or "PATH[:SCALE]" strings: LoRAs merged into the DiT as it loads
        kw          TorchBackend options: attention="triton" (the fused kernels, CUDA), offload_model (keep
                    the DiT on the host but for the loop, as the official --offload_model; default: on CUDA,
                    where T5 and CLIP are released before the loop too, so each run reloads them); in a torchrun
                    job parallel=runtime.parallel.init(...), dit_fsdp=True, t5_fsdp=True
        """
        from flf2v.models import checkpoint as ck
        from flf2v.models.lora import load_loras

        from .torch_backend import TorchBackend
        from .cli_args import check_device
        if dtype not in (torch.float32, torch.bfloat16):
            raise InputError(f"dtype {dtype!r}: use torch.float32 (the CPU's, the reference) or torch.bfloat16 (CUDA)")
        device = check_device(str(device) if device is not None else None, flag="device")
        check_names("from_checkpoint()", kw, TORCH_OPTIONS)
        if kw.get("attention", "sdpa") not in ATTENTION_KINDS:  # was dit.py's ValueError, after the tokenizer
            raise InputError(f"attention={kw['attention']!r}: use one of {', '.join(map(repr, ATTENTION_KINDS))}")
        preset = ck.preset_for(ckpt_dir)
        tokenizer = ck.load_tokenizer(ckpt_dir, preset)  # its errors before any weight loads
        backend = TorchBackend(ckpt_dir, preset, dtype, device, loras=load_loras(loras, ckpt_dir), **kw)
        return cls(backend, tokenizer, preset, device, cuda_graph, kw.get("parallel"))

    @classmethod
    def from_engines(cls, folder, ckpt_dir=None, device=None, cuda_graph: bool = True, loras=(),
                     parallel=None) -> "Pipeline":
        """The engines of one `flf2v-build` folder (e.g. engines/h100-sm90-trt11.4/720p): TensorRT engines
        run on CUDA, ONNX Runtime graphs on the CPU, AOTInductor packages where they were compiled for
        (device overrides). The tokenizer, and the check that
        the engines were built from these weights, come from `ckpt_dir`, by default the checkpoint the
        folder was built from. A static folder's runs have its grid and frame count (`video_shape`); a
        dynamic one's any grid and frame count of its profiles (EngineError naming the build otherwise).
        `loras` are the run's LoRAs (none: the base model), whatever the folder was built with: ONNX Runtime
        swaps them in, TensorRT refuses other ones than its build's (runtime/loras.py). `parallel`: CFG-parallel
        in a torchrun job, each process running its branch on its own batch-1 DiT engine."""
        from flf2v.models import checkpoint as ck
        from flf2v.models.lora import load_loras

        from flf2v.export import manifest as M

        from .backends import open_backend
        m = M.load(folder)
        try:
            kind, ckpt_dir = m["backend"], ckpt_dir or m["checkpoint"]["dir"]
        except (KeyError, TypeError):
            raise M.EngineError(_not_engines(folder, ckpt_dir)) from None
        if device is not None:  # "gpu" was torch's RuntimeError listing every device type it knows
            from .cli_args import check_device
            device = check_device(str(device), flag="device")
        if kind == "aoti":  # the device the packages were compiled for
            built = torch.device(next(iter(m["engines"].values()), {}).get("builder", {}).get("device", "cpu"))
        device = torch.device(device or ("cuda" if kind == "trt" else built.type if kind == "aoti" else "cpu"))
        preset = ck.preset_for(ckpt_dir)
        if parallel is not None and parallel.sp is not None:
            raise InputError("Ulysses (--ulysses_size > 1) runs on the torch backend: engines hold whole sequences")
        tokenizer = ck.load_tokenizer(ckpt_dir, preset)
        backend = open_backend(kind, folder, ckpt_dir, preset, device, loras=load_loras(loras, ckpt_dir))
        return cls(backend, tokenizer, preset, device, cuda_graph, parallel)

    # -----------------------------------------------------------------------------------------------
    def request(self, prompt: str, first_frame, last_frame=None, **options) -> Request:
        """The run `generate` makes with these options (see `generate`): validated, every default resolved
        (the task's official ones; the engines' grid and frame count when the backend has fixed shapes)."""
        if own := [k for k in ("latents", "output", "progress") if k in options]:
            raise TypeError(f"request() takes no {own[0]!r}: it is an option of generate() alone")
        check_names("generate()", options, run_options())
        first_frame = as_image(first_frame)
        cfg_parallel = self.parallel is not None and self.parallel.cfg_parallel
        return make_request(self.preset, prompt, (first_frame.height, first_frame.width), last_frame is not None,
                            self.backend, cfg_parallel=cfg_parallel, said=self.said, **options)

    def generate(self, prompt: str, first_frame, last_frame=None, *,
                 latents: torch.Tensor | None = None, output: str = "video", progress: bool = True,
                 **options) -> torch.Tensor | None:
        """A video from a prompt and its first (and, for FLF2V, last) frame, each a path, a PIL image or an
        array (runtime.media.as_image); None on every process of a torchrun job but rank 0, which alone
        decodes (`output="latent"` returns the latents on every rank).

        options   size ("W*H", the max area), frame_num (4n+1), sample_solver ("unipc" | "dpm++"),
                  sample_steps, sample_shift, guide_scale, seed (-1: random), negative_prompt ("" : the
                  task's official one), cfg_batch (2: cond + uncond as one DiT batch, 1: two calls; at
                  guide_scale 1, no uncond: the DiT batch of the one call, 2 = [x, x]), sample_timesteps
                  (e.g. [1000, 750, 500, 250]: the few-step sampler of step-distilled models, guide scale 1
                  unless given), cache ("off" | "magcache" | "teacache": skip the DiT's blocks on the steps
                  the calibrated schedule allows, runtime/cache.py) with cache_threshold (0: none skipped),
                  cache_max_skips, cache_calibration (a calibration file); unset ones take the task's
                  official defaults (see `request`). `self.last_request` records them, `self.last_cache`
                  the cache's schedule (None without a cache).
        latents   initial noise [1, 16, T_lat, h, w] fp32 instead of the seed's (to reproduce or compare a run)
        output    "video": [3, frames, H, W] in [-1, 1] (decoded); "latent": the final latents
                  [1, 16, T_lat, h, w] fp32, not decoded
        Calls from several threads run one after another.
        """
        if output not in ("video", "latent"):
            raise ValueError(f"output must be 'video' or 'latent', got {output!r}")
        # paths, PIL images and arrays alike, read as the CLI reads them (orientation, bit depth, alpha)
        first_frame = as_image(first_frame)
        last_frame = as_image(last_frame) if last_frame is not None else None
        req = self.request(prompt, first_frame, last_frame, **options)
        if last_frame is not None:
            warn_if_stretched(first_frame, last_frame)
        for name, frame in (("first", first_frame), ("last", last_frame)):
            if frame is not None:
                warn_if_upscaled(name, frame, req.height, req.width)
        with self.lock:  # one run at a time (see __init__)
            if self.parallel is not None:  # every rank runs rank 0's seed, and the same run (else InputError)
                run = _run_of(req, first_frame, last_frame, latents)
                req = replace(req, seed=self.parallel.agree(run, req.seed))
            if latents is not None:  # no seed drew this noise: a random one recorded would not reproduce it
                req = replace(req, seed=None)
            self.last_request = req
            logger.info("run: %s", {k: v for k, v in req.to_json().items() if k != "negative_prompt"})
            self.seed = req.seed
            self.times.seconds.clear()
            self.times.device_used.clear()
            self.backend.set_video(req.height, req.width, req.frame_num)
            with self.times("preprocess"):
                inputs = self.prepare(req, first_frame, last_frame, latents)
            latent = self.denoise_video(req, inputs, progress)
            if output == "latent":
                return latent
            if self.parallel is not None and not self.parallel.is_main:
                return None  # rank 0 decodes and writes
            with self.times("vae_decode", self.device):
                bar = partial(tqdm, desc="decoding", unit="latent frame", disable=not progress, leave=False)
                video = self.backend.vae_decode(latent, bar)[0]
                # NaN, clamped to the mp4's range, wrote a broken video, exit 0; a sum: a mask is GBs at 720p
                if not torch.isfinite(video.sum(dtype=torch.float32)):
                    raise NumericalError("the VAE decoded the latents to NaN/Inf; check the checkpoint's VAE "
                                         "(Wan2.1_VAE.pth), or try --dtype fp32")
                return video

    def prepare(self, req: Request, first_frame: Image.Image, last_frame: Image.Image | None,
                latents: torch.Tensor | None = None) -> dict:
        """Host-side inputs of the networks: noise, token ids, CLIP pixels, the VAE condition and its mask."""
        p = self.preset
        flf2v = last_frame is not None
        frames = [image_to_tensor(first_frame)] + ([image_to_tensor(last_frame)] if flf2v else [])
        h, w, n = req.height, req.width, req.frame_num
        lat = (p.vae.z_dim, (n - 1) // p.vae.stride[0] + 1, h // p.vae.stride[1], w // p.vae.stride[2])
        if latents is None:
            # Noise is drawn on the CPU so a seed gives the same video on every device (the official
            # code draws it on the GPU).
            latents = torch.randn(1, *lat, dtype=torch.float32, generator=torch.Generator().manual_seed(req.seed))
        elif not isinstance(latents, torch.Tensor):
            raise InputError(f"latents must be a torch tensor of shape {(1, *lat)}, got {type(latents).__name__}")
        elif tuple(latents.shape) != (1, *lat):
            raise InputError(f"latents must have shape {(1, *lat)} for this run, got {tuple(latents.shape)}")
        elif not torch.isfinite(latents).all():  # else "the latents became NaN" blames the dtype or checkpoint
            raise InputError("latents hold NaN or Inf; pass finite noise (e.g. torch.randn)")
        ids, mask = self.tokenizer([req.prompt, req.negative_prompt] if req.cfg else [req.prompt])
        sized = [resize(f, h, w) for f in frames]  # the official bug fix: last frame resized too
        cond = torch.zeros(3, n, h, w)
        cond[:, 0] = sized[0]
        if flf2v:
            cond[:, -1] = sized[1]
        return {"noise": latents.float(), "ids": ids, "mask": mask, "cond": cond,
                "pixels": torch.cat([clip_preprocess(f[None], p.clip) for f in frames]),
                "msk": condition_mask(n, lat[2], lat[3], flf2v)}

    def denoise_video(self, req: Request, inputs: dict, progress: bool = True) -> torch.Tensor:
        """Encoders, then the denoising loop: the final latents [1, 16, T_lat, h, w] fp32."""
        p, dev, times, b = self.preset, self.device, self.times, self.backend
        with times("text_encoder", dev):
            context = b.encode_text(inputs["ids"], inputs["mask"]).float()
        with times("image_encoder", dev):
            clip_fea = b.encode_image(inputs["pixels"]).float().reshape(1, -1, p.clip.dim)
        with times("vae_encode", dev):
            y = torch.cat([inputs["msk"][None].to(dev), b.vae_encode(inputs["cond"][None]).to(dev)], dim=1)
        sampler = make_sampler(req.sample_solver, req.sample_steps, req.sample_shift, req.sample_timesteps)
        self.last_cache = None
        if req.cache != "off":
            self.last_cache = step_cache.plan(req.cache, req.cache_threshold, req.cache_max_skips,
                                              req.cache_calibration, sampler.timesteps, req.cfg, b.ckpt_dir, p)
            logger.info("step cache: %s", self.last_cache.to_json())
        with times("denoise", dev):
            b.prepare_denoise()
            key = (req.sample_solver, req.sample_steps, req.sample_shift, req.sample_timesteps)
            latent = self.denoise(sampler, inputs["noise"].to(dev), context.to(dev), clip_fea.to(dev), y,
                                  req.guide_scale, req.cfg_batch, progress, key, req.cfg,
                                  self.last_cache.compute if self.last_cache else None)
            b.finish_denoise()
            self._release_stale_graphs()
        return latent

    def _release_stale_graphs(self) -> None:
        """Captured graphs whose DiT the backend released or moved (its graph token changed) could never
        replay: their private pools go now, before VAE decode needs the memory. A backend that keeps its
        DiT (TensorRT keep_dit) keeps its graphs for the next run."""
        stale = [loop for key, loop in self.loops.items()
                 if loop.graph is not None and self.backend.graph_token(key[1]) != loop.token]
        for loop in stale:
            loop.release_graphs()
        if stale:
            logger.debug("released %d captured graph(s) whose DiT the backend released or moved", len(stale))
        if stale and self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -----------------------------------------------------------------------------------------------
    KEEP_LOOPS = 2  # denoising loops (and their captured CUDA graphs) kept, one per shape and settings

    def denoise(self, sampler, x, context, clip_fea, y, guide: float, cfg_batch: int, progress: bool,
                sampler_key=None, cfg: bool = True, compute: tuple[bool, ...] | None = None):
        """The denoising loop (`cfg=False`: no uncond forward, `context` may hold the prompt's row only;
        `compute`: the step cache's schedule, False = a cached step).
        Loops are kept per (latent shape, CFG layout, guide scale, sampler settings `sampler_key`), the
        newest KEEP_LOOPS of them, so a run at a shape already used reuses the loop's buffers and, on CUDA, replays its captured graph: only while the backend's `graph_token` (naming
        the DiT buffers the graph reads) is unchanged; otherwise it captures again."""
        capture = self.cuda_graph and x.device.type == "cuda" and self.backend.capturable
        cached = compute is not None and not all(compute)
        key = (tuple(x.shape), cfg_batch, cfg, float(guide), sampler_key, cached)
        loop = self.loops.pop(key, None) if sampler_key is not None else None
        if loop is None:
            b, p = self.backend, self.preset.dit.patch_size
            hidden = (x.shape[2] // p[0], x.shape[3] // p[1], x.shape[4] // p[2], self.preset.dit.dim)
            split = self.parallel.cfg if self.parallel is not None and cfg else None
            loop = DenoiseLoop(b.denoise, sampler, x, context, clip_fea, y, guide, cfg_batch, cfg,
                               (b.denoise_full, b.denoise_cached) if cached else None, hidden, split)
        else:
            loop.reset(x, context, clip_fea, y)
        if sampler_key is not None:
            self.loops[key] = loop
            while len(self.loops) > self.KEEP_LOOPS:
                self.loops.pop(next(iter(self.loops)))
        if capture:
            token = self.backend.graph_token(cfg_batch)
            if loop.graph is None or token is None or token != loop.token:
                logger.debug("capturing the denoising step as a CUDA graph (token %r)", token)
                loop.capture()
                loop.token = self.backend.graph_token(cfg_batch)
        with tqdm(total=loop.steps, desc="denoising", disable=not progress, leave=False) as bar:
            out = loop.run(bar, compute if cached else None)
            return out.clone() if sampler_key is not None else out


def _run_of(req: Request, first_frame: Image.Image, last_frame: Image.Image | None, latents) -> dict:
    """What must be equal on every rank of a torchrun job: the settings but the seed, the frames' pixels, the
    latents given."""
    pixels = hashlib.sha256(first_frame.tobytes() + (last_frame.tobytes() if last_frame is not None else b""))
    noise = hashlib.sha256(latents.cpu().numpy().tobytes()).hexdigest() if latents is not None else None
    return {**{k: v for k, v in req.to_json().items() if k != "seed"}, "frames": pixels.hexdigest(),
            "latents": noise}


def _not_engines(folder, ckpt_dir) -> str:
    """Why `folder` (no readable manifest) is no engine folder, and the fix (a build into a checkpoint's own
    folder, or into a root of engine folders, was the fix it gave)."""
    from flf2v.export import manifest as M
    from flf2v.models.layouts import is_checkpoint
    if not Path(folder).is_dir():
        return f"{folder}: no such folder; build one: {M.rebuild_hint(ckpt_dir or 'CKPT', folder)}"
    if (Path(folder) / M.MANIFEST).is_file():
        return (f"{folder}: its {M.MANIFEST} is damaged or incomplete (no backend or checkpoint); rebuild it: "
                f"{M.rebuild_hint(ckpt_dir or 'CKPT', folder)}")
    if is_checkpoint(folder):
        return (f"{folder} is a checkpoint folder, not an engine folder; give the folder flf2v-build wrote (its "
                f"--out), or use Pipeline.from_checkpoint for the PyTorch reference")
    if under := M.folders_under(folder):
        return f"{folder} holds engine folders, one per shape; give one of them, e.g. {under[0]}"
    return (f"{folder}: not an engine folder (no readable {M.MANIFEST}); build one: "
            f"{M.rebuild_hint(ckpt_dir or 'CKPT', folder)}")
