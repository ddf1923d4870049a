"""One generation's settings, checked in one place: `Request` and `make_request`.

Every mistake a user can make about a run (the prompt, the frames asked for, the size and frame count,
sampler, guidance, seed, step cache, CFG-parallel) is refused here as an InputError, one line naming the fix
in the CLI's flag names. `make_request` needs no weights: `flf2v-run` calls it before anything loads, with
no backend yet (the reference's rules: any shape, both CFG layouts, the step cache); `Pipeline.request`
calls it again with the backend that runs, whose engines may fix the shape (its defaults too) and the layouts.
"""
from __future__ import annotations

import difflib
import inspect
import math
import numbers
import os
import random
import warnings
from dataclasses import asdict, dataclass

from flf2v.models import config
from flf2v.models.config import Preset

from . import cache as step_cache
from .media import FrameError, InputError
from .scheduler import DISTILL, check_timesteps, make_sampler


@dataclass(frozen=True)
class Request:
    """One generation with every default resolved: what `Pipeline.generate` ran (and --metrics records)."""
    prompt: str
    negative_prompt: str | None  # None without CFG: not encoded
    height: int
    width: int
    frame_num: int
    sample_solver: str
    sample_steps: int
    sample_shift: float
    guide_scale: float
    seed: int | None  # None: the run's noise was given (generate's latents)
    cfg_batch: int  # the DiT batch of each call (2: [x, x] in one call)
    cfg: bool = True  # False at guide 1: the uncond forward and the negative prompt skipped
    sample_timesteps: tuple[int, ...] | None = None  # the few-step list of the DISTILL sampler
    cache: str = "off"  # step cache (runtime/cache.py): "off" | "magcache" | "teacache"
    cache_threshold: float = 0.0
    cache_max_skips: int | None = None
    cache_calibration: step_cache.Calibration | None = None

    CACHE_KEYS = ("cache", "cache_threshold", "cache_max_skips", "cache_calibration")

    def to_json(self) -> dict:
        # keys of features not in use are left out, so the record of a plain run keeps its shape
        d = {k: v for k, v in asdict(self).items() if k not in ("cfg", "sample_timesteps", *self.CACHE_KEYS)}
        if self.sample_timesteps is not None:
            d["sample_timesteps"] = list(self.sample_timesteps)
        if not self.cfg:
            d["cfg"] = "off"
        if self.cache != "off":
            d.update(cache=self.cache, cache_threshold=self.cache_threshold, cache_max_skips=self.cache_max_skips,
                     cache_calibration=self.cache_calibration.source)
        return d


# other libraries' and the CLI's names of generate()'s options (a TypeError named make_request, not the one meant)
ALIASES = {"guidance_scale": "guide_scale", "sample_guide_scale": "guide_scale", "num_inference_steps": "sample_steps",
           "base_seed": "seed", "num_frames": "frame_num", "shift": "sample_shift", "flow_shift": "sample_shift"}


def run_options() -> tuple[str, ...]:
    """The options of a run (`make_request`'s keywords from `size` on): what Pipeline.generate takes."""
    names = list(inspect.signature(make_request).parameters)
    return tuple(names[names.index("size"):])


def check_names(where: str, given: dict, known) -> None:
    """TypeError for a keyword of `given` not in `known`, naming the one meant where it can be told."""
    for name in given:
        if name not in known:
            meant = ALIASES.get(name) or next(iter(difflib.get_close_matches(name, known, 1)), None)
            raise TypeError(f"{where} got an unknown option {name!r}; " + (
                f"did you mean {meant}=?" if meant else f"the options are {', '.join(known)}"))


def make_request(preset: Preset, prompt: str, first_hw: tuple[int, int], last_frame: bool, backend=None, *,
                 ckpt_dir=None, cfg_parallel: bool = False, said: set | None = None,
                 size: str | None = None, frame_num: int | None = None, sample_solver: str | None = None,
                 sample_steps: int | None = None, sample_shift: float | None = None,
                 guide_scale: float | None = None, seed: int = -1, negative_prompt: str = "",
                 cfg_batch: int | None = None, sample_timesteps=None, cache: str = "off",
                 cache_threshold: float | None = None, cache_max_skips: int | None = None,
                 cache_calibration=None) -> Request:
    """The run of these settings with every default resolved (the task's official ones; a static engine
    folder's shape), or InputError. `first_hw`: the first frame's (H, W); `last_frame`: whether one is
    given. `backend` (runtime/backend.py), None before one is chosen; `ckpt_dir` then names the checkpoint
    (a step cache's calibration is looked up beside it). `cfg_parallel`: each process runs one CFG branch.
    `said`: warnings already given (each once)."""
    prompt, negative_prompt = _typed("prompt", prompt, str, False), _typed("negative_prompt", negative_prompt, str)
    seed = _typed("seed", seed, numbers.Integral, False)
    frame_num, sample_steps, cfg_batch, cache_max_skips = (_typed(k, v, numbers.Integral) for k, v in (
        ("frame_num", frame_num), ("sample_steps", sample_steps), ("cfg_batch", cfg_batch),
        ("cache_max_skips", cache_max_skips)))
    sample_shift, guide_scale, cache_threshold = (_typed(k, v, numbers.Real) for k, v in (
        ("sample_shift", sample_shift), ("guide_scale", guide_scale), ("cache_threshold", cache_threshold)))
    if cache_calibration is not None and not isinstance(cache_calibration, (str, os.PathLike)):
        raise InputError(f"cache_calibration {cache_calibration!r} must be the path of a flf2v-calibrate-cache file")
    if hasattr(sample_timesteps, "tolist"):  # a tensor's items are 0-d tensors, not integers
        sample_timesteps = sample_timesteps.tolist()
    if isinstance(sample_timesteps, (str, numbers.Number)):  # a 0-d tensor's tolist() is one number
        raise InputError(f"sample_timesteps must be a list of integers like [1000, 750, 500, 250], got the "
                         f"{'string' if isinstance(sample_timesteps, str) else 'number'} {sample_timesteps!r}")
    flf2v = preset.dit.model_type == "flf2v"
    if not prompt.strip():  # as the official code, which encodes it ("" is </s> alone): refused before
        warnings.warn("the prompt is empty: the video follows the frames alone, as the official code runs it",
                      stacklevel=4)
    if flf2v and not last_frame:
        raise InputError(f"{preset.name} needs a last frame; pass --last_frame")
    if not flf2v and last_frame:
        raise InputError(f"{preset.name} is image-to-video and takes no last frame; drop --last_frame")
    if not -1 <= seed < 2**63:
        raise InputError(f"--base_seed {seed} is out of range; use -1 or 0..2^63-1")
    if seed >= 2**32:  # torch's CPU generator (the noise's, on every device) seeds from the low 32 bits only
        warnings.warn(f"--base_seed {seed}: the noise generator keeps its low 32 bits, so this is the video of seed "
                      f"{seed % 2**32}; seeds 0..{2**32 - 1} are distinct", stacklevel=4)
    size, frame_num = default_shape(preset, size, frame_num, backend.video_shape if backend is not None else None)
    h, w, frame_num = output_shape(preset, first_hw, size, frame_num)
    if backend is not None:  # engines: EngineError naming the build that serves it
        backend.check_video(h, w, frame_num)
    sample_solver, steps, shift, guide, sample_timesteps = sampling(
        preset, size, sample_solver, sample_steps, sample_shift, guide_scale, sample_timesteps)
    cfg = guide != 1.0
    cfg_batch = dit_batch(cfg, cfg_batch, backend, cfg_parallel, said if said is not None else set())
    cache_threshold, cache_max_skips, calibration = cache_settings(
        preset, backend, ckpt_dir, size, cache, cache_threshold, cache_max_skips, cache_calibration, steps,
        sample_timesteps is not None, cfg)
    return Request(prompt=prompt, negative_prompt=(negative_prompt or preset.sample_neg_prompt) if cfg else None,
                   height=h, width=w, frame_num=frame_num, sample_solver=sample_solver, sample_steps=steps,
                   sample_shift=shift, guide_scale=guide,
                   seed=random.randint(0, 2**32 - 1) if seed < 0 else seed, cfg_batch=cfg_batch, cfg=cfg,
                   sample_timesteps=sample_timesteps, cache=cache, cache_threshold=cache_threshold,
                   cache_max_skips=cache_max_skips, cache_calibration=calibration)


def _typed(name: str, value, kind: type, optional: bool = True):
    """`value` as `kind` (numbers.Integral: int, numbers.Real: float, str), or an InputError naming it: the
    Python API's arguments are not typed by argparse (a numpy integer is an integer; a bool is not one)."""
    if value is None and optional:
        return None
    if isinstance(value, kind) and not isinstance(value, bool):
        return value if kind is str else int(value) if kind is numbers.Integral else float(value)
    what = {numbers.Integral: "an integer", numbers.Real: "a number", str: "a string"}[kind]
    raise InputError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")


# ---- video shape -------------------------------------------------------------------------------------

def parse_size(size: str, preset: Preset) -> tuple[int, int]:
    """'W*H' (the official --size spelling) -> (W, H), only among the preset's sizes."""
    if size not in preset.sizes:
        raise InputError(f"--size {size} is not supported by {preset.name}; choose one of "
                         f"{', '.join(preset.sizes)}")
    w, h = (int(v) for v in size.split("*"))
    return w, h


def latent_grid(img_hw: tuple[int, int], max_area: int, stride: int, patch: int) -> tuple[int, int]:
    """Official sizing (models.config.latent_grid); a frame too elongated for it is an InputError."""
    try:
        return config.latent_grid(img_hw, max_area, stride, patch)
    except ValueError as e:
        raise FrameError(f"the first frame: {e}") from None  # the last one is resized to its shape


def check_frame_num(frame_num: int, preset: Preset) -> int:
    most = 4 * (preset.dit.rope_max_pos - 1) + 1  # RoPE positions are latent frames: 1 + (frames - 1) / 4
    if not isinstance(frame_num, int) or frame_num < 5 or (frame_num - 1) % 4:
        low = (frame_num - 1) // 4 * 4 + 1 if isinstance(frame_num, int) and frame_num > 5 else None
        # "e.g. 81" was past what a small model's engines serve
        near = "5 or more" if low is None else f"{most} or fewer" if low >= most else f"{low} or {low + 4}"
        raise InputError(f"--frame_num {frame_num} is not of the form 4n+1 with n >= 1; use {near} ({preset.name}'s "
                         f"default: {preset.frame_num})")
    if frame_num > most:
        raise InputError(f"--frame_num {frame_num} is over the model's {most} frame limit")
    return frame_num


def default_shape(preset: Preset, size: str | None, frame_num: int | None,
                  fixed: tuple[int, int, int] | None = None) -> tuple[str, int]:
    """(size, frame_num) of a run: those given, else a static engine folder's own (`fixed`, its (H, W,
    frames)), else the model's."""
    own = f"{fixed[1]}*{fixed[0]}" if fixed else None
    # an odd static folder (flf2v-run's hint for a photo out of every dynamic range) was sized at the model's
    # default area: its own W*H, no official size, was refused as the run's --size and the hint looped
    size = size or (own if own in preset.sizes else preset.default_size)
    frame_num = frame_num if frame_num is not None else fixed[2] if fixed else preset.frame_num
    return size, frame_num


def size_hw(preset: Preset, size: str | None) -> tuple[int, int]:
    """(H, W) of `size` (None: the model's default): a first frame of exactly that shape (--plan without frames)."""
    w, h = parse_size(size or preset.default_size, preset)
    return h, w


def output_shape(preset: Preset, first_hw: tuple[int, int], size: str, frame_num: int) -> tuple[int, int, int]:
    """(height, width, frames) of the video made from a first frame of `first_hw` (H, W) pixels: the
    official sizing within the area of `size`."""
    frame_num = check_frame_num(frame_num, preset)
    w_max, h_max = parse_size(size, preset)
    lat_h, lat_w = latent_grid(first_hw, w_max * h_max, preset.vae.stride[1], preset.dit.patch_size[1])
    return lat_h * preset.vae.stride[1], lat_w * preset.vae.stride[2], frame_num


# ---- sampling --------------------------------------------------------------------------------------------

def few_steps(solver: str, timesteps, steps: int | None) -> tuple[str, tuple[int, ...], int]:
    """(solver, timesteps, steps) of a run given an explicit timestep list, which implies the DISTILL sampler
    (the few-step one of step-distilled models); InputError for a bad list or a conflicting choice."""
    if solver not in (None, DISTILL):  # an explicit unipc too: it ran the distill sampler without a word
        raise InputError(f"--sample_solver {solver} does not apply to --sample_timesteps (the few-step distill "
                         f"sampler); drop one of them")
    try:
        timesteps = check_timesteps(timesteps)
    except ValueError as e:
        raise InputError(str(e)) from None
    if steps is not None and steps != len(timesteps):
        raise InputError(f"--sample_steps {steps} disagrees with the {len(timesteps)} values of --sample_timesteps; "
                         f"drop --sample_steps")
    return DISTILL, timesteps, len(timesteps)


def sampling(preset: Preset, size: str, solver: str, steps: int | None, shift: float | None, guide: float | None,
             timesteps) -> tuple[str, int, float, float, tuple[int, ...] | None]:
    """(solver, steps, shift, guide scale, timesteps) with the official defaults; InputError for a bad value."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
        raise InputError(f"--sample_steps {steps} must be a positive integer, e.g. 50")
    for flag, v in (("--sample_shift", shift), ("--sample_guide_scale", guide)):
        if v is not None and not math.isfinite(v):
            raise InputError(f"{flag} {v} is not a finite number")
    if shift is not None and shift <= 0:
        raise InputError(f"--sample_shift {shift} must be positive, e.g. 16")
    if shift is None:
        # official generate.py: I2V at 480p samples with shift 3, other sizes with the task's default
        i2v_480p = preset.dit.model_type != "flf2v" and size in ("832*480", "480*832")
        shift = 3.0 if i2v_480p else preset.sample_shift
    n = preset.sample_steps if steps is None else steps
    if timesteps is not None:  # the few-step sampler of step-distilled models
        solver, timesteps, n = few_steps(solver, timesteps, steps)
    solver = solver or "unipc"
    # distilled models run without CFG (LightX2V: enable_cfg false), the others at the official scale
    guide = (1.0 if timesteps is not None else preset.sample_guide_scale) if guide is None else guide
    try:
        make_sampler(solver, n, shift, timesteps)  # built per run: check it now
    except ValueError as e:
        raise InputError(str(e)) from None
    return solver, n, float(shift), float(guide), timesteps


def dit_batch(cfg: bool, asked: int | None, backend, cfg_parallel: bool, said: set) -> int:
    """The DiT batch of each call (`asked`, else 2 with CFG and 1 without) among the layouts the backend
    holds (engines may hold only one); with CFG-parallel 1, each process running one branch."""
    batches = backend.cfg_batches if backend is not None else (1, 2)
    if asked not in (None, 1, 2):
        raise InputError(f"cfg_batch {asked!r} must be 1 (cond and uncond as two DiT calls) or 2 (one call)")
    if cfg_parallel:
        if not cfg:
            raise InputError("--cfg_parallel splits the cond and uncond DiT calls, but guide scale 1 runs no "
                             "uncond call; drop --cfg_parallel (use --ulysses_size for all the processes)")
        if 1 not in batches:
            raise InputError(f"--cfg_parallel runs the batch-1 DiT on each process, but the engines in "
                             f"{backend.folder} hold only the batch-2 one; build it with "
                             f"`flf2v-build --cfg_batch 1|both`")
        asked = 1
    want = 2 if cfg else 1
    batch = asked if asked in batches else want if want in batches else batches[0]
    if not cfg and batch == 2 and 1 not in batches:
        # CFG-free on batch-2-only engines: [x, x] with the cond context twice, one half thrown away
        msg = ("guide scale 1 runs the DiT without CFG, but these engines hold only the batch-2 DiT, so each "
               "step runs it on two copies; `flf2v-build --cfg_batch 1|both` builds the batch-1 DiT that "
               "halves that work")
        if msg not in said:
            said.add(msg)
            warnings.warn(msg, stacklevel=5)  # dit_batch < make_request < request < generate
    elif asked is not None and asked != batch:
        warnings.warn(f"cfg_batch {asked}: these engines hold only the batch-{batch} DiT, so the DiT runs "
                      f"as batch {batch}", stacklevel=5)
    return batch


def cache_settings(preset: Preset, backend, ckpt_dir, size: str, method: str, threshold, max_skips, calibration,
                   steps: int, few_step: bool, cfg: bool) -> tuple[float, int | None, step_cache.Calibration | None]:
    """(threshold, max_skips, Calibration or None) of a run's step cache of `steps` steps (`few_step`: an explicit
    --sample_timesteps list; `cfg`: with CFG); InputError when it cannot run."""
    if method == "off" and (threshold is not None or max_skips is not None or calibration):
        raise InputError("--cache_threshold, --cache_max_skips and --cache_calibration apply to a step cache; "
                         "add --cache magcache or --cache teacache")
    try:
        threshold, max_skips = step_cache.check_settings(method, threshold, max_skips)
        if method == "off":
            return threshold, max_skips, None
        if backend is not None and not backend.steps_cache:
            raise InputError(f"--cache {method}: the engines in {backend.folder} were built without the step "
                             f"cache's DiT graphs (dit_cached_b*); {backend.hint}, or use --backend torch")
        # before the calibration's lookup, whose fix (a calibration run) would not make this run work
        if steps < step_cache.MIN_STEPS and threshold > 0:  # it skipped 3 of a 4-step distilled run, silently
            raise InputError(f"--cache {method} needs a run of at least {step_cache.MIN_STEPS} steps (its curves "
                             f"are calibrated on such runs; a shorter one loses most of its few DiT calls); this "
                             + (f"few-step --sample_timesteps run has {steps}: drop --cache" if few_step else
                                f"run has {steps}: give --sample_steps {step_cache.MIN_STEPS} or more, or drop "
                                f"--cache"))
        ckpt_dir = backend.ckpt_dir if backend is not None else ckpt_dir
        found = step_cache.find_calibration(preset, ckpt_dir, size, calibration)
        if method == "magcache" and cfg and not found.cfg:  # its uncond ratios repeat the cond ones, silently
            warnings.warn(f"step-cache calibration {found.source} was recorded without CFG (guide scale 1), this "
                          f"run has CFG: its cond curve stands in for the uncond one; run flf2v-calibrate-cache "
                          f"at this guide scale for both", stacklevel=5)
        return threshold, max_skips, found
    except step_cache.CacheError as e:
        raise InputError(str(e)) from None
