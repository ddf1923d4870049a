"""`flf2v-run`: prompt + first frame + last frame -> mp4, with the official generate.py flag names."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path

import torch


TASKS = ("flf2v-14B", "i2v-14B")
BACKENDS = ("auto", "torch", "ort", "trt")


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y"):
        return True
    if v.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other user mistake
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="flf2v-run", description=__doc__)
    a = ap.add_argument
    a("--task", default="flf2v-14B", choices=TASKS)
    a("--size", default=None, help="max output area as W*H, e.g. 1280*720 (default: the model's)")
    a("--frame_num", type=int, default=None, help="frames to generate, 4n+1 (default 81)")
    a("--ckpt_dir", required=True, help="official Wan2.1 checkpoint directory")
    a("--first_frame", default=None, help="first frame image (FLF2V)")
    a("--last_frame", default=None, help="last frame image (FLF2V)")
    a("--image", default=None, help="input image (I2V; same as --first_frame)")
    a("--prompt", default=None, help="text prompt")
    a("--negative_prompt", default="", help="negative prompt (default: the official one)")
    a("--offload_model", type=_str2bool, default=None,
      help="keep encoders and DiT off the GPU when not in use (default true, as the official code)")
    a("--t5_cpu", action="store_true", help="accepted for compatibility; the text encoder is freed before "
                                              "denoising anyway")
    a("--sample_solver", default="unipc", choices=("unipc", "dpm++"))
    a("--sample_steps", type=int, default=None)
    a("--sample_shift", type=float, default=None)
    a("--sample_guide_scale", type=float, default=None)
    a("--base_seed", type=int, default=-1, help="seed; -1 draws one at random")
    a("--save_file", default=None, help="output mp4 (default: a new name in the current directory)")
    a("--backend", default="auto", choices=BACKENDS,
      help="auto: the engines of --engines (or of engines/<this machine>) when built, else torch")
    a("--engines", default=None, help="engine folder from `make engines` (default: engines/<this GPU or cpu-ort>)")
    a("--dtype", default=None, choices=("fp32", "bf16"), help="torch backend precision (default: bf16 on "
                                                                "CUDA, fp32 on CPU)")
    a("--device", default=None, help="cuda or cpu (default: cuda when available)")
    a("--metrics", default=None, help="write per-stage seconds and peak memory as JSON here")
    a("--quiet", action="store_true", help="no progress bars")
    return ap


def _fail(msg: str) -> int:
    print(f"flf2v-run: error: {msg}", file=sys.stderr)
    return 2


def default_save_file(task: str, size: str, prompt: str) -> Path:
    stem = re.sub(r"[^\w]+", "_", prompt[:50]).strip("_") or "video"
    path = Path(f"{task}_{size.replace('*', 'x')}_{stem}_{time.strftime('%Y%m%d-%H%M%S')}.mp4")
    n = 1
    while path.exists():  # never clobber a file the user did not name
        path = path.with_name(f"{path.stem.rsplit('.', 1)[0]}.{n}.mp4")
        n += 1
    return path


def peak_memory(device: torch.device) -> dict[str, float]:
    out = {"host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def check_args(args) -> None:
    from flf2v.runtime.media import InputError
    if args.image and args.first_frame:
        raise InputError("give the input image once: --image or --first_frame, not both")
    args.first_frame = args.first_frame or args.image
    if not args.first_frame:
        raise InputError("--first_frame is required (the image the video starts from)")
    if args.task.startswith("flf2v") and not args.last_frame:
        raise InputError("--last_frame is required for flf2v-14B (the image the video ends on)")
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
    if not -1 <= args.base_seed < 2**63:
        raise InputError(f"--base_seed {args.base_seed} is out of range; use -1 or 0..2^63-1")
    if args.save_file and not args.save_file.lower().endswith(".mp4"):
        raise InputError(f"--save_file {args.save_file} must end in .mp4")


def auto_backend(engines: str | None) -> str:
    from flf2v.export.build import trt_available
    from flf2v.runtime.engines import MANIFEST, EngineError, default_folder
    candidates = [Path(engines)] if engines else [default_folder("trt" if trt_available() else "ort")]
    for folder in candidates:
        try:
            return json.loads((folder / MANIFEST).read_text())["backend"]
        except FileNotFoundError:
            if engines:
                raise EngineError(f"--engines {engines}: no {MANIFEST}; build engines with `make engines`") from None
        except (json.JSONDecodeError, KeyError, TypeError, OSError) as e:
            raise EngineError(f"{folder / MANIFEST}: unreadable ({e!r}); rebuild with `make engines`") from None
    return "torch"


def make_pipeline(args, device: torch.device):
    from flf2v.models import checkpoint as ck
    from flf2v.runtime.media import InputError
    from flf2v.runtime.pipeline import Pipeline

    preset = ck.preset_for(args.ckpt_dir)
    want = "flf2v" if args.task.startswith("flf2v") else "i2v"
    if preset.dit.model_type != want:
        raise InputError(f"--task {args.task} needs a {want} checkpoint, but {args.ckpt_dir} holds a "
                         f"{preset.dit.model_type} model; pass the matching --task")
    if args.backend == "auto":
        args.backend = auto_backend(args.engines)
    if args.backend == "torch":
        from flf2v.runtime.torch_backend import TorchBackend
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or
                                                               ("bf16" if device.type == "cuda" else "fp32")]
        offload = device.type == "cuda" if args.offload_model is None else args.offload_model
        backend = TorchBackend(args.ckpt_dir, preset, dtype, device, offload_model=offload)
    else:
        from flf2v.runtime.engines import open_backend
        backend = open_backend(args.backend, args.engines, args.ckpt_dir, preset, device)
    return Pipeline(backend, ck.load_tokenizer(args.ckpt_dir, preset), preset, device)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flf2v.models.checkpoint import CheckpointError
    from flf2v.runtime.denoise import NumericalError
    from flf2v.runtime.media import InputError, load_image, save_video

    t0 = time.perf_counter()
    try:
        check_args(args)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        first = load_image(args.first_frame)
        last = load_image(args.last_frame) if args.last_frame else None
        pipe = make_pipeline(args, device)
        size = args.size or pipe.preset.default_size
        save = Path(args.save_file) if args.save_file else default_save_file(args.task, size, args.prompt)
        video = pipe.generate(args.prompt, first, last, size=size, frame_num=args.frame_num,
                              sample_solver=args.sample_solver, sample_steps=args.sample_steps,
                              sample_shift=args.sample_shift, guide_scale=args.sample_guide_scale,
                              seed=args.base_seed, negative_prompt=args.negative_prompt,
                              progress=not args.quiet)
        with pipe.times("save"):
            save_video(video, save)
    except (InputError, CheckpointError, NumericalError) as e:
        return _fail(str(e))
    except OSError as e:  # disk full, permissions: the video was not written
        return _fail(f"{e.strerror or e} ({e.filename or 'output'}); no video was written")
    total = time.perf_counter() - t0
    mem = peak_memory(device)
    if args.metrics:
        metrics = {"save_file": str(save), "seconds": pipe.times.seconds, "end_to_end_s": total,
                   "memory": mem, "seed": pipe.seed, "backend": args.backend, "device": str(device),
                   "preset": pipe.preset.name, "frames": int(video.shape[1]),
                   "height": int(video.shape[2]), "width": int(video.shape[3]),
                   "versions": {"torch": torch.__version__, "python": platform.python_version()},
                   "args": vars(args)}
        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{args.metrics}.part")
        tmp.write_text(json.dumps(metrics, indent=2, default=str))
        os.replace(tmp, args.metrics)
    mem_s = ", ".join(f"{k} {v:.2f}" for k, v in mem.items())
    print(f"wrote {save} ({video.shape[1]} frames {video.shape[3]}x{video.shape[2]}, seed {pipe.seed}) in "
          f"{total:.1f} s; peak memory: {mem_s}")
    if pipe.preset.name.startswith("tiny") or pipe.preset.name == "small":
        print(f"note: {args.ckpt_dir} is a {pipe.preset.name} test checkpoint with random weights, so the video "
              f"is noise. For real videos pass --ckpt_dir of Wan2.1-FLF2V-14B-720P.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
