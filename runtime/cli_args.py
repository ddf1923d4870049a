"""`flf2v-run`'s flags: the parser (the official generate.py names, the task's defaults in --help), the checks
of the flags that are not a run's settings (files, device, processes, task), and the mapping of the others to
a `Request`'s options, which runtime/request.py checks. All of it before any weight loads."""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

from .media import InputError

TASKS = ("flf2v-14B", "i2v-14B")
BACKENDS = ("auto", "torch", "ort", "trt", "aoti")
DESCRIPTION = """`flf2v-run`: prompt + first frame + last frame -> mp4, with the official generate.py flag names.

One video over several processes (GPUs): `torchrun --nproc_per_node N --no-python flf2v-run ...
--ulysses_size U [--cfg_parallel] [--dit_fsdp] [--t5_fsdp]` (N = U, or 2U with --cfg_parallel;
runtime/parallel.py)."""


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
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--task", default="flf2v-14B")
    pre.add_argument("--ckpt_dir", default=None)
    try:  # a bad --task or a flag without its value: the full parser says so, in its one line
        known, _ = pre.parse_known_args(argv)
    except argparse.ArgumentError:
        return get_preset("flf2v-14B")
    if known.ckpt_dir:
        try:
            return ck.preset_for(known.ckpt_dir)
        except (ck.CheckpointError, OSError):
            pass
    return get_preset(known.task if known.task in TASKS else "flf2v-14B")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    p = help_preset(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="flf2v-run", usage=argparse.SUPPRESS,  # errors: one line, exit 2
                                 description=DESCRIPTION,
                                 epilog=f"Defaults shown are {p.name}'s; --task and --ckpt_dir choose the model.")
    for flags in (_input_flags, _sampling_flags, _cache_flags, _output_flags, _backend_flags, _parallel_flags):
        flags(ap.add_argument, p)
    return ap


def _input_flags(a, p) -> None:
    a("--task", default=None, choices=TASKS, help="the model (default: the checkpoint's, else flf2v-14B)")
    a("--size", default=None, help=f"max output area as W*H, one of {', '.join(p.sizes)} (default "
                                   f"{p.default_size}, or a static engine folder's own); the first frame's aspect "
                                   f"ratio is kept")
    a("--frame_num", type=int, default=None,
      help=f"frames to generate, 4n+1 (default {p.frame_num}, or a static engine folder's own)")
    from flf2v.models.layouts import add_checkpoint_flags
    add_checkpoint_flags(a)
    a("--first_frame", default=None, help="first frame image (FLF2V)")
    a("--last_frame", default=None, help="last frame image (FLF2V)")
    a("--image", default=None, help="input image (I2V; same as --first_frame)")
    a("--prompt", default=None, help="text prompt")
    a("--negative_prompt", default="", help=f"negative prompt (default: the official one of {p.name}: "
                                            f"{p.sample_neg_prompt[:12]}...)")
    a("--offload_model", type=_str2bool, default=None,
      help="keep the DiT off the GPU but for the denoising loop (default: the memory plan's choice on CUDA)")
    a("--t5_cpu", action="store_true", help="run the text encoder on the CPU (its 11.4 GB never on the GPU)")
    a("--use_prompt_extend", action="store_true",
      help="official flag; no prompt extender is built in: write the extended prompt into --prompt")
    for flag in ("--prompt_extend_method", "--prompt_extend_model", "--prompt_extend_target_lang"):
        a(flag, default=None, help=argparse.SUPPRESS)


def _sampling_flags(a, p) -> None:
    shift = (f"{p.sample_shift:g}" + (", 3 at 832*480 / 480*832 as the official code"
                                      if p.dit.model_type == "i2v" else ""))
    a("--sample_solver", default=None, choices=("unipc", "dpm++"), help="sampler (default unipc)")
    a("--sample_steps", type=int, default=None, help=f"denoising steps (default {p.sample_steps})")
    a("--sample_shift", type=float, default=None, help=f"flow-matching shift (default {shift})")
    a("--sample_guide_scale", type=float, default=None,
      help=f"classifier-free guidance scale (default {p.sample_guide_scale:g})")
    a("--sample_timesteps", default=None,
      help="few-step sampling of step-distilled models: descending timesteps in 1..1000, e.g. "
           "1000,750,500,250 (LightX2V's 4-step list); runs their flow-matching update, with --sample_shift "
           "applied as theirs (their Wan2.1 I2V configs use 5) and guide scale 1 unless --sample_guide_scale")
    a("--base_seed", type=int, default=-1, help="seed; -1 draws one at random (default -1)")


def _cache_flags(a, p) -> None:
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


def _output_flags(a, p) -> None:
    a("--save_file", default=None, help="output mp4 (default: a new name in the current directory)")
    a("--fps", type=float, default=16, help="frame rate of the mp4, e.g. 24 or 29.97 (default 16, the official rate)")
    a("--metrics", default=None, help="write per-stage seconds, memory, the values used and versions as JSON")
    a("-q", "--quiet", action="store_true",
      help="no progress bars, and of the log only errors (warnings about the run are still said)")
    a("-v", "--verbose", action="count", default=0,
      help="log what runs to stderr: -v the choices and stages, -vv debug detail too")


def _backend_flags(a, p) -> None:
    a("--backend", default="auto", choices=BACKENDS,
      help="auto (default): engines of this checkpoint that serve the run, under --engines or "
           "engines/<this machine>[-plugin]/, else the torch reference; aoti: AOTInductor packages "
           "(flf2v-build --backend aoti)")
    a("--engines", default=None,
      help="engine folder from flf2v-build (make engines), or a folder of them (one per shape)")
    a("--dtype", default=None, choices=("fp32", "bf16"), help="torch backend precision (default: bf16 on "
                                                                "CUDA, fp32 on CPU)")
    a("--attention", default="sdpa", choices=("sdpa", "triton", "sage"),
      help="--backend torch's self-attention: sdpa (PyTorch, default), triton (the fused exact kernel) or sage "
           "(8-bit, SageAttention's method: kernels/sage_attention.py); the Triton ones on CUDA (on a CPU only "
           "in the Triton interpreter, TRITON_INTERPRET=1, slow)")
    a("--quant", default="none", choices=("none", "fp8"),
      help="fp8: the DiT's block linears in FP8 e4m3 (torch._scaled_mm on --backend torch; engines built with "
           "flf2v-build --quant fp8); everything else stays in the run's precision. README \"8-bit\"")
    a("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    a("--gpu_memory", type=float, default=None, metavar="GIB",
      help="plan memory for a card of this many GiB (default on CUDA: the GPU's free memory); README \"Memory "
           "plans\"")
    a("--offload", default=None, metavar="blocks[:N]",
      help="stream the DiT's blocks from pinned host memory, N of them resident on the GPU (default N: the "
           "most that fit); --backend torch, or trt / aoti engines built with --weight_streaming")
    a("--plan", action="store_true", help="print the memory plans for this checkpoint, size and frames, and exit")
    a("--cuda_graph", type=_str2bool, default=True,
      help="on CUDA, replay the denoising step as one captured CUDA graph (default true); false runs it "
           "eagerly, the fallback if capture fails on your setup")
    a("--lora", action="append", default=[], metavar="PATH[:SCALE]",
      help="a LoRA (safetensors: diffusers/PEFT, official or kohya names) for the DiT, scale 1 unless given; "
           "repeatable. Torch merges it while loading; ONNX Runtime engines swap it in without a rebuild; "
           "TensorRT engines must have been built with it (flf2v-build --lora)")


def _parallel_flags(a, p) -> None:
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


# ---- the flags that are not a run's settings -------------------------------------------------------

def infer_task(ckpt_dir: str) -> str:
    """The task of the checkpoint's model (its config.json), so an I2V folder needs no --task."""
    from flf2v.models import checkpoint as ck
    try:
        kind = ck.preset_for(ckpt_dir).dit.model_type
    except (ck.CheckpointError, OSError):
        return "flf2v-14B"  # the checkpoint's own error comes with the checks that read it
    return "flf2v-14B" if kind == "flf2v" else "i2v-14B"


def check_args(args) -> None:
    """The checkpoint folder (or its files), frames given, output paths writable, engine folder present,
    parallel flags that fit the processes."""
    from flf2v.models.layouts import CheckpointError, ckpt_dir_of
    for flag in ("ckpt_dir", "dit", "t5", "clip", "vae", "tokenizer", "first_frame", "last_frame", "image", "size",
                 "save_file", "metrics", "engines", "cache_calibration"):
        if getattr(args, flag, None) == "":  # an unset shell variable: the default would run unasked
            raise InputError(f"--{flag} is empty; give a value or drop the flag")
    try:
        args.ckpt_dir = ckpt_dir_of(args)
    except CheckpointError as e:
        raise InputError(str(e)) from None
    args.task = args.task or infer_task(args.ckpt_dir)
    if args.image and args.first_frame:
        raise InputError("give the input image once: --image or --first_frame, not both")
    args.first_frame = args.first_frame or args.image
    # --plan prints the memory plans of a size alone: no prompt or frames needed (a first frame sets the grid)
    if args.prompt is None and not args.plan:  # the official generate.py falls back on its example prompt, not shipped
        raise InputError('--prompt is required: describe the video to generate (--prompt "...")')
    if not args.first_frame and not args.plan:
        raise InputError("--first_frame is required (the image the video starts from)")
    extend = [f"--{k}" for k in ("use_prompt_extend", "prompt_extend_method", "prompt_extend_model",
                                 "prompt_extend_target_lang") if getattr(args, k)]
    if extend:  # the official extender needs Qwen (a local Qwen2.5-VL or the DashScope API): not ours to run
        raise InputError(f"{extend[0]}: flf2v has no prompt extender (the official one rewrites the prompt with "
                         f"Qwen); write the extended prompt into --prompt and drop {' '.join(extend)}")
    if not (math.isfinite(args.fps) and 1 <= args.fps <= 240):
        raise InputError(f"--fps {args.fps:g} is out of range; use 1..240 (16 is the official rate)")
    if args.engines and not Path(args.engines).is_dir():
        what = "is a file, not a folder" if Path(args.engines).exists() else "no such folder"
        raise InputError(f"--engines {args.engines}: {what}; give a folder flf2v-build built, or drop "
                         f"--engines to use engines/<this machine>/")
    if args.engines and _is_checkpoint(args.engines):  # the fix was a build into the checkpoint's own folder
        raise InputError(f"--engines {args.engines} is a checkpoint folder, not an engine folder; give the folder "
                         f"flf2v-build wrote (its --out), or drop --engines to use engines/<this machine>/")
    from .media import check_folder, check_output
    if args.save_file:
        check_output("--save_file", args.save_file)  # first: a folder given was told to "end in .mp4"
        if not args.save_file.lower().endswith(".mp4"):  # quoted: a trailing space is invisible
            raise InputError(f"--save_file {args.save_file!r} must end in .mp4")
    else:  # the default name goes to the current folder
        check_folder("--save_file", "(default)", Path.cwd())
    if args.metrics:
        check_output("--metrics", args.metrics)
        check_metrics_path(args)
    check_processes(args)
    check_memory_flags(args)


def check_metrics_path(args) -> None:
    """--metrics replaces whatever its path holds: a .json file, never one of the run's inputs (a checkpoint's
    config.json, an engine folder's manifest.json)."""
    if not args.metrics.lower().endswith(".json"):
        raise InputError(f"--metrics {args.metrics} must end in .json")
    path = Path(args.metrics).resolve()
    for flag, folder in (("checkpoint folder --ckpt_dir", args.ckpt_dir), ("engine folder --engines", args.engines)):
        if folder and path.is_relative_to(Path(folder).resolve()):
            raise InputError(f"--metrics {args.metrics} is inside the {flag} {folder}; write it elsewhere")


def check_memory_flags(args) -> None:
    """--gpu_memory positive; --offload spelled blocks[:N]; the plan flags on the torch backend."""
    if args.gpu_memory is not None and not (math.isfinite(args.gpu_memory) and args.gpu_memory > 0):
        raise InputError(f"--gpu_memory {args.gpu_memory:g} must be a positive number of GiB, e.g. 24")
    if args.offload is not None:
        m = re.fullmatch(r"blocks(?::(\d+))?", args.offload)
        if not m:
            raise InputError(f"--offload {args.offload}: use blocks or blocks:N (N DiT blocks resident on the GPU)")
        args.offload_blocks = int(m.group(1)) if m.group(1) is not None else None
    planned = args.offload is not None or args.t5_cpu
    if args.t5_cpu and args.backend not in ("auto", "torch"):
        raise InputError("--t5_cpu applies to --backend torch; engines run T5 on the GPU and release it before the "
                         "DiT loads: drop it or use --backend torch")
    if args.offload is not None and args.backend not in ("auto", "torch", "trt", "aoti"):
        raise InputError(f"--offload applies to --backend torch and to trt or aoti engines built with flf2v-build "
                         f"--weight_streaming; {args.backend} engines load whole: drop it or use --backend torch")
    if planned and (args.ulysses_size > 1 or args.dit_fsdp or args.t5_fsdp):
        raise InputError("--offload / --t5_cpu run in one process; several GPUs share the weights instead "
                         "(--dit_fsdp, --t5_fsdp)")


def check_processes(args) -> None:
    from .parallel import check_layout, world_from_env
    check_layout(world_from_env()[1], args.ulysses_size, args.cfg_parallel, args.ring_size)
    if (args.dit_fsdp or args.t5_fsdp) and world_from_env()[1] == 1:
        raise InputError("--dit_fsdp / --t5_fsdp shard weights over the processes of a torchrun job; launch with "
                         "`torchrun --nproc_per_node N ...` or drop them")
    if args.dit_fsdp and args.lora:
        raise InputError("--dit_fsdp loads each process's rows of the checkpoint; LoRAs are merged whole: drop "
                         "--dit_fsdp or --lora")
    if args.dist_timeout <= 0:
        raise InputError(f"--dist_timeout {args.dist_timeout} must be positive, e.g. 600")


def check_model(args, preset) -> None:
    """--task and --ulysses_size against the checkpoint's model (its config, no weights)."""
    want = "flf2v" if args.task.startswith("flf2v") else "i2v"
    if preset.dit.model_type != want:
        article = "an" if want == "i2v" else "a"
        raise InputError(f"--task {args.task} needs {article} {want} checkpoint, but {args.ckpt_dir} holds "
                         f"{'an' if preset.dit.model_type == 'i2v' else 'a'} {preset.dit.model_type} model; pass the "
                         f"matching --task")
    if preset.dit.num_heads % args.ulysses_size:
        raise InputError(f"--ulysses_size {args.ulysses_size} must divide {preset.name}'s {preset.dit.num_heads} "
                         f"attention heads")


def _is_checkpoint(folder) -> bool:
    """A checkpoint folder holding no engines (flf2v-build writes none into one unless told to)."""
    from flf2v.export import manifest as M
    from flf2v.models.layouts import is_checkpoint
    return not M.folders_under(folder) and is_checkpoint(folder)


def check_device(name: str | None, flag: str = "--device") -> torch.device:
    """The device `name` names (None: cuda where usable, else cpu), or InputError in terms of `flag` (the API
    says device="cpu", not --device cpu)."""
    cli = flag.startswith("--")
    given, fix = (f"{flag} {name}", f"{flag} cpu") if cli else (f"{flag}={name!r}", f'{flag}="cpu"')
    if name == "":  # an unset shell variable: the default device ran unasked
        raise InputError(f"{flag} is empty; give a value or drop the flag" if cli else
                         f"{flag}='' is empty; give a device or leave it out")
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise InputError(f"{given} is not a device; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{given}: no CUDA GPU is usable here (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); use {fix}")
    if device.type not in ("cuda", "cpu"):
        raise InputError(f"{given}: only cuda and cpu are supported")
    return device


# ---- the run's settings: flags -> Request options ---------------------------------------------------

def request_options(args) -> dict:
    """The `Request` options (runtime/request.py) the flags give; unset ones stay None (the defaults)."""
    timesteps = None
    if args.sample_timesteps is not None:  # "1000,750": ints where they are, the rest refused by the request
        parts = [v.strip() for v in args.sample_timesteps.split(",")]
        if "" in parts:  # "1000,,500" lost a value: it ran the 2 steps left, without a word
            raise InputError(f"--sample_timesteps {args.sample_timesteps!r} has an empty item; give descending "
                             f"integers separated by single commas, e.g. 1000,750,500,250")
        timesteps = [int(v) if re.fullmatch(r"[+-]?\d+", v) else v for v in parts]
    return dict(size=args.size, frame_num=args.frame_num, sample_solver=args.sample_solver,
                sample_steps=args.sample_steps, sample_shift=args.sample_shift, guide_scale=args.sample_guide_scale,
                seed=args.base_seed, negative_prompt=args.negative_prompt, sample_timesteps=timesteps,
                cache=args.cache, cache_threshold=args.cache_threshold, cache_max_skips=args.cache_max_skips,
                cache_calibration=args.cache_calibration)
