"""`flf2v-run`: prompt + first frame + last frame -> mp4, with the official generate.py flag names.

One video over several processes (GPUs): `torchrun --nproc_per_node N --no-python flf2v-run ...
--ulysses_size U [--cfg_parallel] [--dit_fsdp] [--t5_fsdp]` (N = U, or 2U with --cfg_parallel;
runtime/parallel.py)."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import signal
import sys
import time
import warnings
from pathlib import Path

import torch


TASKS = ("flf2v-14B", "i2v-14B")
BACKENDS = ("auto", "torch", "ort", "trt", "aoti")


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y"):
        return True
    if v.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def help_preset(argv: list[str] | None):
    """The model preset whose defaults `--help` shows: the checkpoint's (when --ckpt_dir is readable),
    else the --task's."""
    from flf2v.models import checkpoint as ck
    from flf2v.models.config import get_preset
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="flf2v-14B", choices=TASKS)
    pre.add_argument("--ckpt_dir", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.ckpt_dir:
        try:
            return ck.preset_for(known.ckpt_dir)
        except (ck.CheckpointError, OSError):
            pass
    return get_preset(known.task)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    p = help_preset(sys.argv[1:] if argv is None else argv)
    shift = (f"{p.sample_shift:g}" + (", 3 at 832*480 / 480*832 as the official code"
                                      if p.dit.model_type == "i2v" else ""))
    ap = argparse.ArgumentParser(prog="flf2v-run", usage=argparse.SUPPRESS,  # errors: one line, exit 2
                                 description=__doc__,
                                 epilog=f"Defaults shown are {p.name}'s; --task and --ckpt_dir choose the model.")
    a = ap.add_argument
    a("--task", default=None, choices=TASKS, help="the model (default: the checkpoint's, else flf2v-14B)")
    a("--size", default=None, help=f"max output area as W*H, one of {', '.join(p.sizes)} (default "
                                   f"{p.default_size}, or a static engine folder's own); the first frame's aspect "
                                   f"ratio is kept")
    a("--frame_num", type=int, default=None,
      help=f"frames to generate, 4n+1 (default {p.frame_num}, or a static engine folder's own)")
    a("--ckpt_dir", required=True, help="official Wan2.1 checkpoint directory")
    a("--first_frame", default=None, help="first frame image (FLF2V)")
    a("--last_frame", default=None, help="last frame image (FLF2V)")
    a("--image", default=None, help="input image (I2V; same as --first_frame)")
    a("--prompt", default=None, help="text prompt")
    a("--negative_prompt", default="", help=f"negative prompt (default: the official one of {p.name}: "
                                            f"{p.sample_neg_prompt[:12]}...)")
    a("--offload_model", type=_str2bool, default=None,
      help="keep encoders and DiT off the GPU when not in use (default true on CUDA, as the official code)")
    a("--t5_cpu", action="store_true", help="accepted for compatibility; the text encoder is freed before "
                                              "denoising anyway")
    a("--sample_solver", default="unipc", choices=("unipc", "dpm++"), help="sampler (default unipc)")
    a("--sample_steps", type=int, default=None, help=f"denoising steps (default {p.sample_steps})")
    a("--sample_shift", type=float, default=None, help=f"flow-matching shift (default {shift})")
    a("--sample_guide_scale", type=float, default=None,
      help=f"classifier-free guidance scale (default {p.sample_guide_scale:g})")
    a("--sample_timesteps", default=None,
      help="few-step sampling of step-distilled models: descending timesteps in 1..1000, e.g. "
           "1000,750,500,250 (LightX2V's 4-step list); runs their flow-matching update, with --sample_shift "
           "applied as theirs (their Wan2.1 I2V configs use 5) and guide scale 1 unless --sample_guide_scale")
    a("--cache", default="off", choices=("off", "magcache", "teacache"),
      help="step cache: skip the DiT's blocks on the steps a calibrated schedule, fixed before the loop, allows "
           "(reusing the last computed step's residual; MagCache or TeaCache decisions). Default off")
    a("--cache_threshold", type=float, default=None,
      help="the cache's error budget: larger skips more steps, 0 skips none (default: magcache 0.24, teacache "
           "0.2, the authors' Wan2.1 I2V 720p settings)")
    a("--cache_max_skips", type=int, default=None,
      help="most steps skipped in a row (default: magcache 6, teacache no limit)")
    a("--cache_calibration", default=None,
      help="calibration JSON from flf2v-calibrate-cache (default: <ckpt_dir>/flf2v_cache_calibration.json when "
           "present, else the authors' published Wan2.1 I2V-14B calibration)")
    a("--base_seed", type=int, default=-1, help="seed; -1 draws one at random (default -1)")
    a("--save_file", default=None, help="output mp4 (default: a new name in the current directory)")
    a("--fps", type=float, default=16, help="frame rate of the mp4, e.g. 24 or 29.97 (default 16, the official rate)")
    a("--backend", default="auto", choices=BACKENDS,
      help="auto (default): engines of this checkpoint that serve the run, under --engines or "
           "engines/<this machine>[-plugin]/, else the torch reference; aoti: AOTInductor packages "
           "(make engines BACKEND=aoti)")
    a("--engines", default=None, help="engine folder from `make engines`, or a folder of them (one per shape)")
    a("--dtype", default=None, choices=("fp32", "bf16"), help="torch backend precision (default: bf16 on "
                                                                "CUDA, fp32 on CPU)")
    a("--device", default=None, help="cuda or cpu (default: cuda when available)")
    a("--cuda_graph", type=_str2bool, default=True,
      help="on CUDA, replay the denoising step as one captured CUDA graph (default true); false runs it "
           "eagerly, the fallback if capture fails on your setup")
    a("--metrics", default=None, help="write per-stage seconds, memory, the values used and versions as JSON")
    a("--lora", action="append", default=[], metavar="PATH[:SCALE]",
      help="a LoRA (safetensors: diffusers/PEFT, official or kohya names) for the DiT, scale 1 unless given; "
           "repeatable. Torch merges it while loading; ONNX Runtime engines swap it in without a rebuild; "
           "TensorRT engines must have been built with it (make engines LORA=...)")
    a("--quiet", action="store_true", help="no progress bars")
    a("--ulysses_size", type=int, default=1,
      help="under torchrun: split the DiT's video tokens over this many processes (Ulysses sequence "
           "parallelism; must divide the attention heads, 40 for the 14B models). Default 1")
    a("--ring_size", type=int, default=1, help="official flag; ring attention is not implemented: only 1")
    a("--cfg_parallel", action="store_true",
      help="under torchrun: run the cond and uncond DiT calls on two halves of the processes (needs CFG)")
    a("--dit_fsdp", action="store_true",
      help="under torchrun: shard the DiT's weights over all processes (FSDP2); each reads only its rows")
    a("--t5_fsdp", action="store_true", help="under torchrun: shard the text encoder's weights likewise")
    a("--dist_timeout", type=float, default=600.0,
      help="seconds a collective waits for the other processes before this one gives up (default 600)")
    return ap


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def _fail(msg: str, code: int = 2, every_rank: bool = True) -> int:
    """One line on stderr; `every_rank` False: said by rank 0 only (a mistake in the flags, which every
    rank of a torchrun job finds alike)."""
    if every_rank or _rank() == 0:
        where = f"rank {_rank()}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"flf2v-run: {where}error: {msg}", file=sys.stderr, flush=True)
    return code


def _say_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line, as errors are, not Python's file:line and source excerpt; said by rank 0 only
    (every rank of a torchrun job finds the same)."""
    if _rank() == 0:
        print(f"flf2v-run: warning: {message}", file=sys.stderr, flush=True)


def _collective_failure(e: RuntimeError) -> bool:
    """torch.distributed's own errors, and gloo's, which come as plain RuntimeErrors naming gloo."""
    return isinstance(e, torch.distributed.DistError) or any(k in str(e) for k in ("gloo", "NCCL", "Connection"))


class Stopped(Exception):
    """torchrun stopped this process (SIGTERM) because another one failed."""


def _on_sigterm(signum, frame):
    raise Stopped()


def default_save_file(task: str, size: str, prompt: str) -> Path:
    stem = re.sub(r"[^\w]+", "_", prompt[:50]).strip("_") or "video"
    path = Path(f"{task}_{size.replace('*', 'x')}_{stem}_{time.strftime('%Y%m%d-%H%M%S')}.mp4")
    n = 1
    while path.exists():  # never clobber a file the user did not name
        path = path.with_name(f"{path.stem.rsplit('.', 1)[0]}.{n}.mp4")
        n += 1
    return path


def peak_memory(device: torch.device, device_used: dict[str, int]) -> dict[str, float]:
    """Host peak RSS; on CUDA also torch's peak and the device memory in use at the end of each stage,
    which includes what TensorRT allocates itself (engines, contexts), unlike torch's counters."""
    out = {"host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if device_used:
            out["cuda_device_used_max_gib"] = max(device_used.values()) / 2**30
    return out


def check_device(name: str | None) -> torch.device:
    from flf2v.runtime.media import InputError
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise InputError(f"--device {name} is not a device; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU is usable here (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); use --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise InputError(f"--device {name}: only cuda and cpu are supported")
    return device


def infer_task(ckpt_dir: str) -> str:
    """The task of the checkpoint's model (its config.json), so an I2V folder needs no --task."""
    from flf2v.models import checkpoint as ck
    try:
        kind = ck.preset_for(ckpt_dir).dit.model_type
    except (ck.CheckpointError, OSError):
        return "flf2v-14B"  # the checkpoint's own error comes with the checks that read it
    return "flf2v-14B" if kind == "flf2v" else "i2v-14B"


def check_args(args) -> None:
    from flf2v.runtime.media import InputError
    args.task = args.task or infer_task(args.ckpt_dir)
    if args.image and args.first_frame:
        raise InputError("give the input image once: --image or --first_frame, not both")
    args.first_frame = args.first_frame or args.image
    if not args.first_frame:
        raise InputError("--first_frame is required (the image the video starts from)")
    if args.task.startswith("flf2v") and not args.last_frame:
        raise InputError(f"--last_frame is required for {args.task} (the image the video ends on)")
    if args.prompt is None or not args.prompt.strip():
        raise InputError("--prompt is empty; describe the video to generate")
    if args.sample_steps is not None and args.sample_steps <= 0:
        raise InputError(f"--sample_steps {args.sample_steps} must be a positive integer, e.g. 50")
    for flag in ("sample_shift", "sample_guide_scale"):
        v = getattr(args, flag)
        if v is not None and not math.isfinite(v):
            raise InputError(f"--{flag} {v} is not a finite number")
    if args.sample_shift is not None and args.sample_shift <= 0:
        raise InputError(f"--sample_shift {args.sample_shift} must be positive, e.g. 16")
    if args.sample_timesteps is not None:  # checked before the models load, as Pipeline.request does
        from flf2v.runtime.pipeline import few_steps
        parts = [v.strip() for v in args.sample_timesteps.split(",") if v.strip()]
        ts = [int(v) if re.fullmatch(r"[+-]?\d+", v) else v for v in parts]
        args.sample_timesteps = few_steps(args.sample_solver, ts, args.sample_steps)[1]
    if args.cache == "off" and (args.cache_threshold is not None or args.cache_max_skips is not None
                                or args.cache_calibration):
        raise InputError("--cache_threshold, --cache_max_skips and --cache_calibration apply to a step cache; "
                         "add --cache magcache or --cache teacache")
    if args.cache != "off":  # checked before the models load, as Pipeline.request does
        from flf2v.runtime.cache import CacheError, check_settings, read_calibration
        try:
            check_settings(args.cache, args.cache_threshold, args.cache_max_skips)
            if args.cache_calibration:
                read_calibration(args.cache_calibration)
        except CacheError as e:
            raise InputError(str(e)) from None
    if not -1 <= args.base_seed < 2**63:
        raise InputError(f"--base_seed {args.base_seed} is out of range; use -1 or 0..2^63-1")
    if not (math.isfinite(args.fps) and 1 <= args.fps <= 240):
        raise InputError(f"--fps {args.fps:g} is out of range; use 1..240 (16 is the official rate)")
    if args.save_file and not args.save_file.lower().endswith(".mp4"):
        raise InputError(f"--save_file {args.save_file} must end in .mp4")
    if args.engines and not Path(args.engines).is_dir():
        raise InputError(f"--engines {args.engines}: no such folder; give a folder `make engines` built, or drop "
                         f"--engines to use engines/<this machine>/")
    from flf2v.runtime.media import check_folder, check_output
    if args.save_file:
        check_output("--save_file", args.save_file)
    else:  # the default name goes to the current folder
        check_folder("--save_file", "(default)", Path.cwd())
    if args.metrics:
        check_output("--metrics", args.metrics)
    from flf2v.runtime.parallel import check_layout, world_from_env
    check_layout(world_from_env()[1], args.ulysses_size, args.cfg_parallel, args.ring_size)
    if (args.dit_fsdp or args.t5_fsdp) and world_from_env()[1] == 1:
        raise InputError("--dit_fsdp / --t5_fsdp shard weights over the processes of a torchrun job; launch with "
                         "`torchrun --nproc_per_node N ...` or drop them")
    if args.dit_fsdp and args.lora:
        raise InputError("--dit_fsdp loads each process's rows of the checkpoint; LoRAs are merged whole: drop "
                         "--dit_fsdp or --lora")
    if args.dist_timeout <= 0:
        raise InputError(f"--dist_timeout {args.dist_timeout} must be positive, e.g. 600")


def check_parallel(args) -> None:
    """The parallel flags against the checkpoint's model, before any process group or weight exists."""
    from flf2v.models import checkpoint as ck
    from flf2v.runtime.media import InputError
    if args.ulysses_size == 1 and not args.cfg_parallel:
        return
    preset = ck.preset_for(args.ckpt_dir)
    if preset.dit.num_heads % args.ulysses_size:
        raise InputError(f"--ulysses_size {args.ulysses_size} must divide {preset.name}'s {preset.dit.num_heads} "
                         f"attention heads")
    guide = args.sample_guide_scale if args.sample_guide_scale is not None else \
        1.0 if args.sample_timesteps is not None else preset.sample_guide_scale
    if args.cfg_parallel and guide == 1.0:
        raise InputError("--cfg_parallel splits the cond and uncond DiT calls, but guide scale 1 runs no uncond "
                         "call; drop --cfg_parallel (use --ulysses_size for all the processes)")


def check_request(args, first_hw: tuple[int, int]) -> None:
    """--size, --frame_num and the step cache's calibration against the checkpoint's model, before any weight
    loads on any backend (a static engine folder's own shape is checked when the folder is chosen, the torch
    backend's defaults in `make_pipeline`)."""
    from flf2v.models import checkpoint as ck
    from flf2v.runtime.media import InputError
    from flf2v.runtime.pipeline import check_frame_num, output_shape
    preset = ck.preset_for(args.ckpt_dir)
    if args.frame_num is not None:
        check_frame_num(args.frame_num, preset.dit.rope_max_pos)
    if args.size is not None:
        output_shape(preset, first_hw, args.size,
                     args.frame_num if args.frame_num is not None else preset.frame_num)
    if args.cache != "off":  # the calibration the schedule needs (reads the checkpoint's headers, no weights)
        from flf2v.runtime.cache import CacheError, find_calibration
        try:
            find_calibration(preset, args.ckpt_dir, args.size or preset.default_size, args.cache_calibration)
        except CacheError as e:
            raise InputError(str(e)) from None


def engine_kind(device: torch.device) -> str:
    """The engines this machine runs: TensorRT on a GPU where it imports, ONNX Runtime on a CPU."""
    if device.type == "cpu":
        return "ort"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "torch"
    return "trt"


def choose_engines(args, preset, first_hw: tuple[int, int], device: torch.device, loras=()):
    """(backend kind, engine folder or None, one line saying what runs). `--engines` may be a folder or a
    root with one folder per shape; without it, `--backend auto` looks under engines/<this machine>[-plugin]/.
    A static folder of exactly the run's shape wins over a dynamic one that serves it."""
    from flf2v.export import manifest as M
    from flf2v.runtime.backends import check_backend
    from flf2v.runtime.engine_folders import build_serving, engine_video_shape, find_engines
    from flf2v.runtime.media import InputError
    from flf2v.runtime.pipeline import output_shape

    kind = args.backend
    if kind == "auto":  # the kind of the engines given, else what this machine runs
        given = [M.load(f).get("backend") for f in M.folders_under(args.engines)] if args.engines else []
        kind = given[0] if given and given[0] in ("ort", "trt", "aoti") else engine_kind(device)
    if kind == "torch":
        return "torch", None, None
    check_backend(kind, device)

    def want(fixed) -> tuple[int, int, int]:
        # unset --size / --frame_num default to a static folder's own, else to the model's
        size = args.size or (f"{fixed[1]}*{fixed[0]}" if fixed else preset.default_size)
        frames = args.frame_num if args.frame_num is not None else fixed[2] if fixed else preset.frame_num
        return output_shape(preset, first_hw, size, frames)

    cfg_parallel = getattr(args, "cfg_parallel", False)  # each process runs the batch-1 DiT

    def serves(m) -> bool:
        if cfg_parallel and "dit_b1" not in m.get("engines", {}):
            return False
        try:
            return M.serves(m, preset, *want(engine_video_shape(m)))
        except (InputError, KeyError, TypeError, ValueError):
            return False

    from flf2v.runtime import loras as L
    roots = [Path(args.engines)] if args.engines else [M.target_root(kind), M.target_root(kind, "plugin")]
    folder, unusable, other_shapes = find_engines(roots, args.ckpt_dir, preset, kind, serves,
                                                  prefer=lambda m: not L.needs_swap(m, loras))  # LoRAs built in
    if folder is not None:
        return kind, folder, None
    if args.engines and unusable and not other_shapes:
        raise M.EngineError(unusable[0])  # the folder given cannot serve this checkpoint: its reason and fix
    why = other_shapes + unusable
    name = build_serving(preset, *want(None))
    root = Path(args.engines) if args.engines else None
    if root is not None and (root / M.MANIFEST).is_file():
        root = root.parent  # a shape folder was given: the new shape goes beside it
    fix = M.rebuild_hint(args.ckpt_dir, root / name if root else None, name, backend=kind,
                         loras=L.lora_arg(loras) if kind != "ort" else "",  # ORT swaps LoRAs in
                         cfg_batch="both" if cfg_parallel else None)
    run = f"a {first_hw[1]}x{first_hw[0]} first frame" + (f", --size {args.size}" if args.size else "") + (
        f", {args.frame_num} frames" if args.frame_num else "") + (" with --cfg_parallel (the batch-1 DiT)"
                                                                   if cfg_parallel else "")
    if args.engines or args.backend != "auto":
        detail = f" ({why[0]})" if why else ""
        raise M.EngineError(f"no {kind} engines in {args.engines or roots[0]} serve {run}{detail}; {fix}, "
                            f"or use --backend torch")
    note = f"no current {kind} engines for this checkpoint serve {run} under {roots[0]}; {fix}"
    return "torch", None, note


def make_pipeline(args, device: torch.device, first_hw: tuple[int, int], parallel=None):
    from flf2v.models import checkpoint as ck
    from flf2v.models.lora import load_loras
    from flf2v.runtime.media import InputError
    from flf2v.runtime.pipeline import Pipeline

    preset = ck.preset_for(args.ckpt_dir)
    want = "flf2v" if args.task.startswith("flf2v") else "i2v"
    if preset.dit.model_type != want:
        raise InputError(f"--task {args.task} needs a {want} checkpoint, but {args.ckpt_dir} holds a "
                         f"{preset.dit.model_type} model; pass the matching --task")
    loras = load_loras(args.lora, args.ckpt_dir)  # checked before anything loads
    torch_only = args.ulysses_size > 1 or args.dit_fsdp or args.t5_fsdp
    if torch_only and args.backend not in ("auto", "torch"):
        raise InputError(f"--ulysses_size / --dit_fsdp / --t5_fsdp run on --backend torch (engines hold whole "
                         f"sequences and weights; README \"Several GPUs\"); use --backend torch, or --cfg_parallel "
                         f"alone with {args.backend} engines")
    kind, folder, note = ("torch", None, None) if torch_only else choose_engines(args, preset, first_hw, device,
                                                                                 loras)
    args.backend = kind
    if kind == "torch":
        from flf2v.export.contracts import COMPUTE_DTYPE
        from flf2v.runtime.pipeline import output_shape
        from flf2v.runtime.torch_backend import TorchBackend
        # the run's shape with the model's defaults, before the 32.8 GB DiT loads
        output_shape(preset, first_hw, args.size or preset.default_size,
                     args.frame_num if args.frame_num is not None else preset.frame_num)
        precision = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
        offload = device.type == "cuda" if args.offload_model is None else args.offload_model
        backend = TorchBackend(args.ckpt_dir, preset, COMPUTE_DTYPE[precision], device,
                               offload_model=offload and not args.dit_fsdp, loras=loras, parallel=parallel,
                               dit_fsdp=args.dit_fsdp, t5_fsdp=args.t5_fsdp)
        says = f"backend torch (PyTorch reference, {precision} on {device})"
        says += f"; {note}" if note else ""
    else:
        from flf2v.runtime.backends import open_backend
        from flf2v.export.manifest import describe
        backend = open_backend(kind, folder, args.ckpt_dir, preset, device, loras=loras)
        says = f"backend {kind}, engines {folder} ({backend.manifest['precision']}, {describe(backend.manifest)})"
    if loras:
        says += "; LoRAs " + ", ".join(f"{lo.path.name}:{scale:g}" for lo, scale in loras)
    if parallel is not None:
        says += f"; {parallel.world} processes: " + describe_parallel(args)
    if parallel is None or parallel.is_main:
        print(f"flf2v-run: {says}", flush=True)
    return Pipeline(backend, ck.load_tokenizer(args.ckpt_dir, preset), preset, device, cuda_graph=args.cuda_graph,
                    parallel=parallel)


def describe_parallel(args) -> str:
    split = " x ".join(([f"Ulysses {args.ulysses_size}"] if args.ulysses_size > 1 else [])
                       + (["CFG-parallel"] if args.cfg_parallel else []))  # one of them: check_layout
    return ", ".join([split] + [f"{n} weights sharded (FSDP2)" for n, on in (("DiT", args.dit_fsdp),
                                                                            ("T5", args.t5_fsdp)) if on])


def versions() -> dict[str, str]:
    """Every package that computed the video, as installed (absent ones left out)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu13", "tensorrt-cu12",
                "polygraphy", "av", "transformers", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def write_metrics(path: str, metrics: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.part")
    tmp.write_text(json.dumps(metrics, indent=2, default=str))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    warnings.showwarning = _say_warning
    from flf2v.export.manifest import EngineError
    from flf2v.models.checkpoint import CheckpointError
    from flf2v.models.lora import LoRAError
    from flf2v.runtime.denoise import NumericalError
    from flf2v.runtime.media import InputError, load_image, save_video

    from flf2v.runtime import parallel as P

    t0 = time.perf_counter()
    par = None
    try:
        check_args(args)
        check_parallel(args)
        device = check_device(args.device)
        first = load_image(args.first_frame)
        last = load_image(args.last_frame) if args.last_frame else None
        check_request(args, (first.height, first.width))
        t_load = time.perf_counter()
        if P.world_from_env()[1] > 1:
            signal.signal(signal.SIGTERM, _on_sigterm)
            par = P.init(args.ulysses_size, args.cfg_parallel, device, args.dist_timeout, args.ring_size)
            device = par.device
            args.quiet = args.quiet or not par.is_main
        pipe = make_pipeline(args, device, (first.height, first.width), par)
        t_load = time.perf_counter() - t_load
        video = pipe.generate(args.prompt, first, last, size=args.size, frame_num=args.frame_num,
                              sample_solver=args.sample_solver, sample_steps=args.sample_steps,
                              sample_shift=args.sample_shift, guide_scale=args.sample_guide_scale,
                              seed=args.base_seed, negative_prompt=args.negative_prompt,
                              sample_timesteps=args.sample_timesteps, cache=args.cache,
                              cache_threshold=args.cache_threshold, cache_max_skips=args.cache_max_skips,
                              cache_calibration=args.cache_calibration, progress=not args.quiet)
        if video is not None:  # rank 0 of a torchrun job, or the one process
            save = Path(args.save_file) if args.save_file else default_save_file(
                args.task, f"{video.shape[3]}*{video.shape[2]}", args.prompt)
            with pipe.times("save"):
                save_video(video, save, fps=args.fps)
    except InputError as e:
        return _fail(str(e), every_rank=False)
    except (CheckpointError, NumericalError, EngineError, LoRAError) as e:  # may be one rank's (its shard)
        return _fail(str(e))
    except KeyboardInterrupt:  # the video is written atomically: nothing half-written is left
        return _fail("interrupted; no video was written", 130, every_rank=False)
    except Stopped:
        return _fail("stopped: another process of this torchrun job failed (see its line above); no video was "
                     "written", 1)
    except RuntimeError as e:  # a peer died (connection reset) or hung past --dist_timeout; else a bug
        if par is None or not _collective_failure(e):
            raise
        msg = str(e).strip().splitlines()[0][:200]
        return _fail(f"a collective with the other processes failed ({msg}); another process died or hung "
                     f"(--dist_timeout {args.dist_timeout:g} s); no video was written", 1)
    except OSError as e:  # disk full, permissions: the video was not written
        return _fail(f"{e.strerror or e} ({e.filename or 'output'}); no video was written")
    finally:
        if par is not None:
            P.shutdown()
    total = time.perf_counter() - t0
    mem = peak_memory(device, pipe.times.device_used)
    if par is not None and not par.is_main:  # every rank reports its own memory; rank 0 the rest
        print(f"flf2v-run: rank {par.rank}: peak memory: " + ", ".join(f"{k} {v:.2f}" for k, v in mem.items()),
              flush=True)
        return 0
    if args.metrics:
        # the stages add up to the end-to-end time: "other" is argument checks and reading the images
        seconds = {"load": t_load, **pipe.times.seconds}
        seconds["other"] = total - sum(seconds.values())
        try:
            write_metrics(args.metrics, {
                "save_file": str(save), "seconds": seconds, "end_to_end_s": total, "memory": mem,
                "cuda_device_used_gib": {k: v / 2**30 for k, v in pipe.times.device_used.items()},
                "run": pipe.last_request.to_json(), "fps": args.fps, "backend": args.backend,
                "engines": str(getattr(pipe.backend, "folder", "")) or None, "device": str(device),
                "preset": pipe.preset.name, "versions": versions(), "args": vars(args),
                **({"parallel": {"processes": par.world, "layout": describe_parallel(args)}} if par else {}),
                **({"cache": pipe.last_cache.to_json()} if pipe.last_cache else {})})
        except OSError as e:  # checked before the run; the disk may still fill
            return _fail(f"{e.strerror or e} ({args.metrics}); the video is {save}, the metrics were not "
                         "written")
    mem_s = ", ".join(f"{k} {v:.2f}" for k, v in mem.items())
    cached = ""
    if pipe.last_cache:
        c = pipe.last_cache.to_json()
        cached = f", {c['method']} computed {c['steps_computed']} of {len(pipe.last_cache.compute)} steps"
    print(f"wrote {save} ({video.shape[1]} frames {video.shape[3]}x{video.shape[2]}, seed {pipe.seed}{cached}) in "
          f"{total:.1f} s; peak memory{' (rank 0)' if par else ''}: {mem_s}")
    if pipe.preset.name.startswith("tiny") or pipe.preset.name == "small":
        real = "Wan2.1-FLF2V-14B-720P" if pipe.preset.dit.model_type == "flf2v" else "Wan2.1-I2V-14B-720P"
        print(f"note: {args.ckpt_dir} is a {pipe.preset.name} test checkpoint with random weights, so the video "
              f"is noise. For real videos pass --ckpt_dir of {real}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
