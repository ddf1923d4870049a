"""`flf2v-calibrate-cache`: one full run of the PyTorch reference that records the step cache's per-step
curves for this checkpoint and writes them next to it (runtime/cache.py reads them on `--cache` runs).

    flf2v-calibrate-cache --ckpt_dir CKPT [--first_frame A.png [--last_frame B.png]] [--prompt "..."]
                          [--size 1280*720] [--frame_num 81] [--sample_steps 50] [--out FILE]

Without frames and prompt it calibrates on a built-in neutral sample (NEUTRAL_PROMPT, `builtin_frames`).

What it records, as the methods' authors calibrate (runtime/cache.py names their code):
- MagCache: per step and CFG branch, the mean over tokens of |r_i| / |r_{i-1}|, r the blocks' residual
  (output minus input) and |.| the L2 norm over channels; rounded to 5 decimals, the first pair 1.0.
- TeaCache: the degree-4 polynomial (np.polyfit) from the rel-L1 change of the time embedding e between
  consecutive steps to the rel-L1 change of the DiT's output of each branch.
One sample, as MagCache's authors calibrate; TeaCache's fitted over many videos, so more runs into one file
is a possible refinement. The file records the checkpoint's fingerprint; a run refuses it for another one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flf2v import log

from . import cache as C
from .torch_backend import TorchBackend


class Recorder(TorchBackend):
    """The torch backend whose every DiT call runs in full and records, per batch row, the residual's per-token
    norms, the output and the timestep (the rest of the backend contract is TorchBackend's own)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.calls = []

    def denoise(self, x, t, context, clip_fea, y):
        v, hidden = self.denoise_full(x, t, context, clip_fea, y)
        tokens = self.dit.tokens(x.to(self.dtype), y.to(self.dtype))
        norms = (hidden - tokens).float().norm(dim=-1).flatten(1)
        self.calls.append((norms.cpu().clone(), v.float().cpu().clone(), t.cpu().clone()))  # t: a loop buffer
        return v


def branches(calls) -> list[list[tuple]]:
    """Per CFG branch (the rows of a call: [cond, uncond] with CFG as one batch-2 call, or the one row
    without CFG), the recorded (norms, output, timestep) of each step."""
    return [[(n[r], v[r], t[r]) for n, v, t in calls] for r in range(calls[0][0].shape[0])]


def calibration(calls, cfg: bool, ckpt_dir, preset) -> dict:
    per_branch = branches(calls)
    steps = len(per_branch[0])
    if steps < C.MIN_STEPS:
        raise ValueError(f"calibration needs at least {C.MIN_STEPS} steps, got {steps}")
    ratios = [[1.0] * len(per_branch)]
    for i in range(1, steps):
        ratios.append([round(float((br[i][0] / br[i - 1][0]).mean()), 5) for br in per_branch])
    if not cfg:
        ratios = [[r[0], r[0]] for r in ratios]
    timesteps = [int(t) for _, _, t in per_branch[0]]
    change = C.embedding_change(C.time_embeddings(ckpt_dir, preset, timesteps))
    points = [(float(change[i]), C.rel_l1(br[i][1], br[i - 1][1])) for br in per_branch for i in range(1, steps)]
    xs, ys = np.array(points).T
    return {"magcache": {"mag_ratios": [v for pair in ratios for v in pair], "steps": steps},
            "teacache": {"coefficients": [float(c) for c in np.polyfit(xs, ys, 4)],
                         "input": "rel-L1 change of the time embedding e (TeaCache use_ret_steps=False)",
                         "points": [[round(x, 6), round(y, 6)] for x, y in points]},
            "timesteps": timesteps}


def run(ckpt_dir, first, last, prompt: str, out=None, device=None, dtype=None, progress: bool = True,
        **options) -> Path:
    """Calibrate `ckpt_dir` with one full generation; the calibration file written (atomically)."""
    from flf2v.export.manifest import checkpoint_fingerprint, write_atomic
    from flf2v.models import checkpoint as ck

    from .cli_args import check_device
    from .pipeline import Pipeline
    from .request import make_request
    device = check_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    preset = ck.preset_for(ckpt_dir)
    out = Path(out) if out else Path(ckpt_dir) / C.CALIBRATION_FILE
    if options.get("sample_steps") is None:  # a curve to resample needs points (the test presets run 4 steps)
        options["sample_steps"] = max(preset.sample_steps, C.MIN_STEPS)
    ck.check_files(ckpt_dir, preset)  # the files and the run's settings, before any weight loads
    make_request(preset, prompt, (first.height, first.width), last is not None, ckpt_dir=ckpt_dir, **options)
    rec = Recorder(ckpt_dir, preset, dtype, device, offload_model=device.type == "cuda")
    # eager steps, CFG as one batch-2 call (no CFG: batch 1): each call's rows are the branches in order
    pipe = Pipeline(rec, ck.load_tokenizer(ckpt_dir, preset), preset, device, cuda_graph=False)
    t0 = time.perf_counter()
    pipe.generate(prompt, first, last, output="latent", progress=progress, **options)
    req = pipe.last_request
    record = {"format": C.FORMAT, "model": preset.name, "checkpoint_fingerprint": checkpoint_fingerprint(ckpt_dir),
              "run": req.to_json(), "seconds": round(time.perf_counter() - t0, 1),
              "created": time.strftime("%Y-%m-%d %H:%M:%S"), **calibration(rec.calls, req.cfg, ckpt_dir, preset)}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(record, indent=1).encode())
    return out


# One sample, as the methods' authors calibrate (MagCache, TeaCache): a plain scene with smooth motion.
NEUTRAL_PROMPT = "A red ball rolls slowly across a wooden table, soft daylight, static camera"


def builtin_frames(ckpt_dir):
    """The calibration frames when none are given: the demo's pair at 16:9 (the last one for FLF2V only)."""
    from flf2v.models import checkpoint as ck
    from flf2v.models.make_tiny import demo_frames
    first, last = demo_frames((640, 360))
    return first, last if ck.preset_for(ckpt_dir).dit.model_type == "flf2v" else None


def main(argv: list[str] | None = None) -> int:
    from flf2v.models.checkpoint import CheckpointError
    from flf2v.runtime.media import InputError, check_output, load_image
    ap = argparse.ArgumentParser(prog="flf2v-calibrate-cache", usage=argparse.SUPPRESS, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--ckpt_dir", required=True, help="official Wan2.1 checkpoint directory")
    a("--first_frame", "--image", default=None,
      help="first frame (FLF2V) or input image (I2V) (default: a built-in pair of 16:9 frames, a ball rolling "
           "across a table)")
    a("--last_frame", default=None, help="last frame (FLF2V)")
    a("--prompt", default=NEUTRAL_PROMPT, help=f"text prompt of the calibration video (default: {NEUTRAL_PROMPT!r})")
    a("--size", default=None, help="max output area W*H (default: the model's)")
    a("--frame_num", type=int, default=None, help="frames, 4n+1 (default: the model's)")
    a("--sample_steps", type=int, default=None, help=f"steps (default: the model's, at least {C.MIN_STEPS}; runs "
                                                       f"with other step counts resample the curve)")
    a("--sample_shift", type=float, default=None)
    a("--sample_guide_scale", type=float, default=None)
    a("--base_seed", type=int, default=0, help="seed of the calibration run (default: 0)")
    a("--device", default=None, help="cuda or cpu (default: cuda when available)")
    a("--out", default=None, help=f"calibration file (default: <ckpt_dir>/{C.CALIBRATION_FILE}, which runs "
                                  f"pick up themselves)")
    a("-q", "--quiet", action="store_true",
      help="no progress bars, and of the log only errors (warnings about the run are still said)")
    a("-v", "--verbose", action="count", default=0, help="log what runs: -v the stages, -vv debug detail too")
    args = ap.parse_args(argv)
    log.setup(-1 if args.quiet else args.verbose, "flf2v-calibrate-cache")
    try:
        if args.sample_steps is not None and args.sample_steps < C.MIN_STEPS:
            raise InputError(f"--sample_steps {args.sample_steps}: calibration needs at least {C.MIN_STEPS} steps")
        if args.out == "":  # an unset shell variable: the default file was written unasked
            raise InputError("--out is empty; give a file or drop the flag")
        if args.out and not args.out.lower().endswith(".json"):  # as --metrics: a calibration is JSON
            raise InputError(f"--out {args.out} must end in .json")
        if args.out is None:  # the default file goes into --ckpt_dir: a file given there was blamed on --out
            from flf2v.models.checkpoint import preset_for
            preset_for(args.ckpt_dir)
        check_output("--out", args.out or str(Path(args.ckpt_dir) / C.CALIBRATION_FILE))  # before the run
        if args.last_frame and not args.first_frame:
            raise InputError("--last_frame needs --first_frame (without both, the built-in pair is used)")
        first, last = builtin_frames(args.ckpt_dir) if args.first_frame is None else (
            load_image(args.first_frame), load_image(args.last_frame) if args.last_frame else None)
        out = run(args.ckpt_dir, first, last, args.prompt, args.out, args.device, progress=not args.quiet,
                  size=args.size, frame_num=args.frame_num, sample_steps=args.sample_steps,
                  sample_shift=args.sample_shift, guide_scale=args.sample_guide_scale, seed=args.base_seed)
    except (InputError, CheckpointError) as e:
        print(f"flf2v-calibrate-cache: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"flf2v-calibrate-cache: error: {e.strerror or e} ({e.filename or 'output'}); nothing was written "
              f"(pass --out to write elsewhere)", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
