"""What the stage comparison runs: our pipeline on each backend, and the peer, diffusers' WanImageToVideoPipeline.
Each runner loads once; `run()` makes one video of its `job`. A backend this machine cannot run raises
`Unavailable` with the reason."""
from __future__ import annotations

import contextlib
import gc
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from flf2v.runtime.pipeline import Pipeline

from .measure import ChildFailed, Probe, run_module, start_clock

log = logging.getLogger("flf2v.bench")
STAGES = ("text_encoder", "image_encoder", "vae_encode", "denoise", "vae_decode")
BACKENDS = ("torch", "torch-triton", "ort", "ort-dynamic", "ort-numpy", "trt", "trt-dynamic", "aoti", "aoti-dynamic",
            "diffusers")
GPU_ONLY = ("torch-triton", "trt", "trt-dynamic")
# variants of an engine backend: (base backend, its options, engine shape; None: the job's own static shape).
# ort-numpy: ONNX Runtime through NumPy arrays instead of IO binding (the path before issue 17); *-dynamic:
# the default `dynamic` build (one build for every shape, issue 12), against the static one in one run.
VARIANTS = {"ort-numpy": ("ort", {"io_binding": False}, None), "ort-dynamic": ("ort", {}, "dynamic"),
            "trt-dynamic": ("trt", {}, "dynamic"), "aoti-dynamic": ("aoti", {}, "dynamic")}


class Unavailable(RuntimeError):
    """This backend cannot run on this machine; the message says why."""


@dataclass
class Job:
    ckpt_dir: Path
    preset: object  # models.config.Preset
    width: int
    height: int
    frames: int
    steps: int
    shift: float
    guide: float
    seed: int = 42
    prompt: str = "A red ball rolls across a wooden table, the camera slowly follows it"
    negative_prompt: str | None = None  # None: the official default of the preset's task

    def __post_init__(self):
        if self.negative_prompt is None:
            self.negative_prompt = self.preset.sample_neg_prompt

    @property
    def size(self) -> str:
        return f"{self.width}*{self.height}"

    def frames_in(self) -> tuple[Image.Image, Image.Image]:
        """First and last frame at exactly the output size: both pipelines then resize nothing for the VAE."""
        from flf2v.models.make_tiny import write_demo_frames
        with tempfile.TemporaryDirectory() as d:
            a, b = write_demo_frames(d, (self.width, self.height))
            return Image.open(a).convert("RGB"), Image.open(b).convert("RGB")


@dataclass
class RunResult:
    seconds: float  # end to end
    stages: dict[str, float]
    host_peak: dict[str, int]
    cuda_peak: dict[str, int | None]
    network_seconds: float | None  # time inside network calls (None where it cannot be told: GPU)
    video: torch.Tensor = field(repr=False)  # [3, F, H, W] in [-1, 1]


class _Runner:
    """What both runners share: the probe, the timed run, and handing memory back when closed."""
    build_seconds = folder = pipe = None

    def __init__(self, job: Job, device: torch.device, dtype: torch.dtype):
        self.job, self.device, self.dtype, self.probe = job, device, dtype, Probe(device)

    def _measure(self, call, to_video=lambda v: v) -> RunResult:
        """Reset the probe, run `call()` under the end-to-end clock, and collect what the probe saw."""
        p = self.probe
        p.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stop = start_clock(self.device)
        out = call()  # as users run it: no extra grad mode
        seconds = stop()
        # the scheduler's steps are timed (diffusers, CPU) but are not network work
        network = sum(v for k, v in p.calls.items() if k != "scheduler") if self.device.type == "cpu" else None
        return RunResult(seconds, dict(p.seconds), dict(p.host_peak), dict(p.cuda_peak), network,
                         to_video(out).float().cpu())

    def close(self) -> None:
        """Free what the runner held, and hand freed heap back to the OS so the next backend's RSS starts near
        where this one's did."""
        self.pipe = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to hand back this way
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class OursRunner(_Runner):
    """flf2v's Pipeline on one of BACKENDS but diffusers (engines: built once into `engines_root`)."""

    def __init__(self, kind: str, job: Job, device: torch.device, dtype: torch.dtype, engines_root: Path):
        super().__init__(job, device, dtype)
        self.name, self.engines_root = kind, engines_root

    def load(self) -> None:
        from flf2v.models import checkpoint as ck
        from flf2v.runtime.torch_backend import TorchBackend
        job, kind = self.job, self.name
        if kind in GPU_ONLY and self.device.type != "cuda":
            raise Unavailable("needs a CUDA GPU")
        if kind in ("torch", "torch-triton"):
            backend = TorchBackend(job.ckpt_dir, job.preset, self.dtype, self.device,
                                   attention="triton" if kind == "torch-triton" else "sdpa")
        else:
            from flf2v.runtime.backends import open_backend
            base, options, shape = VARIANTS.get(kind, (kind, {}, None))
            self.folder = self.folder or self._build_engines(base, shape)
            try:
                backend = open_backend(base, self.folder, job.ckpt_dir, job.preset, self.device, **options)
            except Exception as e:
                raise Unavailable(f"open_backend failed: {type(e).__name__}: {e}") from None
        if self.device.type == "cpu":  # on a GPU a host timer around a call measures the launch only
            for call in ("encode_text", "encode_image", "vae_encode", "vae_decode", "denoise"):  # the networks
                setattr(backend, call, self.probe.wrap(call, getattr(backend, call), span=False))
        self.pipe = Pipeline(backend, ck.load_tokenizer(job.ckpt_dir, job.preset), job.preset, self.device)
        self.pipe.times = self.probe
        self.first, self.last = job.frames_in()

    def _build_engines(self, kind: str, shape: str | None = None) -> Path:
        """Engines serving this job's output grid, built once into engines_root by `flf2v-build` in a child
        process: the static shape of exactly that grid, or the named (dynamic) `shape`."""
        from flf2v.export.contracts import engine_shapes
        from flf2v.export.manifest import checkpoint_fingerprint  # the work folder outlives a checkpoint
        job, grid = self.job, (self.job.width, self.job.height, self.job.frames)
        try:
            shape = shape or next((s.name for s in engine_shapes(job.preset).values()
                                   if (s.width, s.height, s.frame_num) == grid), None)
        except ValueError as e:
            raise Unavailable(str(e)) from None
        if shape is None:
            raise Unavailable(f"export/contracts.py has no engine shape {'x'.join(map(str, grid))} "
                              f"for model preset {job.preset.name}")
        precision = "fp32" if self.dtype == torch.float32 else "bf16"
        fingerprint = checkpoint_fingerprint(job.ckpt_dir)[:8]
        folder = self.engines_root / f"{kind}-{job.preset.name}-{fingerprint}-{shape}-{precision}"
        log.info("%s: engines in %s (built once, then current)", self.name, folder)
        try:
            self.build_seconds = run_module("flf2v.export.build", "--ckpt_dir", str(job.ckpt_dir), "--preset", shape,
                                            "--precision", precision, "--backend", kind, "--cfg_batch", "2",
                                            "--out", str(folder), show_progress=True)
        except ChildFailed as e:
            raise Unavailable(f"flf2v-build failed; {e}") from None
        return folder

    def run(self, steps: int | None = None) -> RunResult:
        job = self.job
        return self._measure(lambda: self.pipe.generate(
            job.prompt, self.first, self.last, size=job.size, frame_num=job.frames, sample_steps=steps or job.steps,
            sample_shift=job.shift, guide_scale=job.guide, seed=job.seed, negative_prompt=job.negative_prompt,
            progress=False))


class DiffusersRunner(_Runner):
    """The peer: diffusers' WanImageToVideoPipeline (with last_image) on the same checkpoint and settings,
    instrumented like ours (README "Benchmarks"): a span per network call, and `denoise` from the end of the
    VAE encode to the start of the VAE decode; on the CPU the host time of its transformer and scheduler calls."""

    name = "diffusers"

    def load(self) -> None:
        try:
            from flf2v.bench.diffusers_peer import build_pipeline
            self.pipe = build_pipeline(self.job.ckpt_dir, self.job.preset, self.dtype, self.device, self.job.shift)
        except ImportError as e:
            raise Unavailable(f"diffusers not importable ({e})") from None
        self.pipe.set_progress_bar_config(disable=True)
        p, pr = self.pipe, self.probe
        for stage, obj in (("text_encoder", p.text_encoder), ("image_encoder", p.image_encoder)):
            obj.forward = pr.wrap(stage, obj.forward)
        p.vae.encode = pr.wrap("vae_encode", p.vae.encode, after=lambda: pr.start("denoise"))
        p.vae.decode = pr.wrap("vae_decode", p.vae.decode, before=lambda: pr.stop("denoise"))
        if self.device.type == "cpu":  # on a GPU a host timer around a call measures the launch only
            p.transformer.forward = pr.wrap("transformer", p.transformer.forward, span=False)
            p.scheduler.step = pr.wrap("scheduler", p.scheduler.step, span=False)
        self.first, self.last = self.job.frames_in()

    def run(self, steps: int | None = None) -> RunResult:
        job = self.job
        return self._measure(lambda: self.pipe(
            image=self.first, last_image=self.last, prompt=job.prompt, negative_prompt=job.negative_prompt,
            height=job.height, width=job.width, num_frames=job.frames, num_inference_steps=steps or job.steps,
            guidance_scale=job.guide, generator=torch.Generator().manual_seed(job.seed), output_type="pt"),
            lambda out: out.frames[0].permute(1, 0, 2, 3) * 2 - 1)  # [F, 3, H, W] in [0, 1] -> ours
