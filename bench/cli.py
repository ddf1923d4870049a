"""`flf2v-bench`: the benchmark suite, one mode per first word, all run and reported alike.

    flf2v-bench --preset tiny|small|720p [--backends torch,ort,ort-dynamic,diffusers] [--repeats N] [--steps N]
                [--ckpt_dir DIR] [--device DEV] [--dtype fp32|bf16] [--interleave] [--cost_only]
    flf2v-bench fewstep [--preset small] [--steps 50]   (50 steps + CFG vs 4 steps CFG-free; LoRA merge/swap cost)
    flf2v-bench cache [--preset small] [--steps 50]     (step cache: MagCache / TeaCache vs off, time and PSNR/SSIM)
    flf2v-bench parallel [--preset tiny-4h] [--steps 8] (multi-process: comm cost model at 720p, measured overhead)
    flf2v-bench kernels [--seq 75600] [--dtype bf16]    (fused Triton attention vs torch SDPA; needs CUDA)
    flf2v-bench export-memory --work DIR [--source lazy|ckpt] (peak RSS and time of the full-size DiT export)
    flf2v-bench load-layouts [--layers 4]               (DiT load time and peak RSS per checkpoint layout)
    flf2v-bench quant [--preset small] [--layers 2]     (FP8 linears: per-layer error, 14B slice, scales, floors)
    flf2v-bench quant --ckpt_dir CKPT [--layers 2]      (the FP8 quality gate on a checkpoint's first blocks)
    flf2v-bench memory [--preset small] [--steps 2]     (memory plans: 14B per card, 4090 time model, measured runs)
Every mode waits (up to --idle_wait s) for an idle machine before timing, and writes
[<mode>-][<preset>-]<machine>-<date>[-N].json and .md (the stage comparison also a .png) into --out.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import tempfile
from pathlib import Path

from flf2v.log import setup as setup_logging
from flf2v.models.layouts import CheckpointError

from . import cache, compare, export_memory, fewstep, kernels, load_layouts, memory, parallel, quant
from .measure import BUSY_PER_CPU, BadInput, ChildFailed, load_avg, wait_for_idle
from .report import machine_info, write

# Checkpoints and engines of the stage comparison persist here between runs: flf2v-build skips current
# engines, so only the first run of a preset pays for its builds (minutes on 2 cores).
DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flf2v" / "bench"


# The mode table: first word -> a module with add_args(parser) and run(session) -> report.Report (None: nothing
# to write). The headline comparison is the mode without a word.
MODES = {"": compare, "fewstep": fewstep, "cache": cache, "parallel": parallel, "kernels": kernels,
         "export-memory": export_memory, "load-layouts": load_layouts, "quant": quant, "memory": memory}
# --work's default, where it is not a temporary folder (None: required)
WORK = {"": str(DEFAULT_WORK), "export-memory": None}


class Session:
    """What every mode gets: its arguments, a work folder (--work, or a temporary one) with random checkpoints,
    the machine, and its load once settle() has waited for it to be idle."""

    def __init__(self, args):
        self.args, self.load = args, None
        self._tmp = None if args.work else tempfile.TemporaryDirectory(prefix=f"flf2v-bench-{args.mode or 'run'}-")
        # absolute: a mode's symlinks into it (load-layouts) resolved a relative target against the link's folder
        self.work = Path(args.work or self._tmp.name).absolute()
        self._made = [f for f in (self.work, *self.work.parents) if not f.exists()]  # deepest first
        self.work.mkdir(parents=True, exist_ok=True)
        self.machine = machine_info()

    def checkpoint(self, model: str) -> Path:
        """A random checkpoint of model preset `model` in the official layout, written once into the work folder."""
        from flf2v.models.make_tiny import write_tiny_checkpoint
        dest = self.work / f"ckpt-{model}"
        if not (dest / "flf2v_tiny.json").exists():
            write_tiny_checkpoint(dest, model, seed=0)
        return dest

    def settle(self) -> None:
        """Right before timing: wait (at most --idle_wait s) for the machine to be idle; its load is reported."""
        self.load = wait_for_idle(self.machine["cpu"]["cpus"], self.args.idle_wait)

    def close(self) -> None:
        if self._tmp:
            self._tmp.cleanup()
        for folder in self._made:  # a run refused before any work leaves no empty folders behind
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def parser(name: str) -> argparse.ArgumentParser:
    """The one parser: the flags every mode shares, then the mode's own."""
    ap = argparse.ArgumentParser(prog=f"flf2v-bench {name}".strip(), description=MODES[name].__doc__ if name
                                 else __doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage=argparse.SUPPRESS)  # errors: one line, as the other commands'
    ap.add_argument("--out", default="bench/results", help="folder for the JSON, Markdown (and PNG) (default: "
                                                           "bench/results)")
    work = WORK.get(name, "")
    ap.add_argument("--work", default=work or None, required=work is None,
                    help="checkpoints, engines and scratch files, kept between runs " + (
                        "(required)" if work is None else f"(default: {work}; '' for a temporary folder)" if work
                        else "(default: a temporary folder)"))
    ap.add_argument("--idle_wait", type=float, default=120.0,
                    help=f"seconds to wait, before timing, for the 1-minute load average to drop below "
                         f"{BUSY_PER_CPU:g} per CPU (0: do not wait; default: 120); the load is reported either way")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="progress lines (-vv: debug ones too)")
    ap.add_argument("-q", "--quiet", action="count", default=0, help="errors only, and no Markdown on stdout")
    MODES[name].add_args(ap)
    return ap


def check_args(args) -> None:
    """Every mode's common flags and counts, before any work (a wrong --out was found only when writing the
    report, minutes of measuring later)."""
    from flf2v.runtime.media import InputError, check_folder
    for flag in ("out", "work"):
        if getattr(args, flag):
            # the default --work is $XDG_CACHE_HOME's: a file there was blamed on a flag never given
            said = f"--{flag}" + (" (its default, under $XDG_CACHE_HOME)" if flag == "work" and args.work ==
                                  str(DEFAULT_WORK) and os.environ.get("XDG_CACHE_HOME") else "")
            try:
                check_folder(said, getattr(args, flag), Path(getattr(args, flag)))
            except InputError as e:
                raise BadInput(str(e)) from None
    if not 0 <= args.idle_wait < math.inf:  # inf waited for ever on a busy machine
        raise BadInput(f"--idle_wait {args.idle_wait:g} must be 0 (do not wait) or more seconds")
    for flag in ("repeats", "steps", "layers", "tokens"):  # 0 read as "the default" before
        if (value := getattr(args, flag, None)) is not None and value < 1:
            raise BadInput(f"--{flag} {value} must be a positive integer")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and argv[0] in MODES else ""
    args = parser(name).parse_args(argv[1:] if name else argv)
    args.mode = name
    setup_logging(args.verbose - args.quiet, prog="flf2v-bench")
    try:
        check_args(args)
    except BadInput as e:
        print(f"flf2v-bench{' ' + name if name else ''}: error: {e}", file=sys.stderr)
        return 2
    session = Session(args)
    try:
        report = MODES[name].run(session)
        if session.load is not None:
            session.load["after"] = load_avg()
        preset = report and (report.preset or getattr(args, "preset", None))
        paths = report and write(report, name, preset, session.machine, session.load, args.out)
    except ChildFailed as e:  # a build or calibration in a child process: its error is the message
        print(f"flf2v-bench: error: {e}", file=sys.stderr)
        return 1
    except (BadInput, CheckpointError) as e:  # the user's flags or files, checked before any weight is read
        print(f"flf2v-bench{' ' + name if name else ''}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk at --out or --work (was a traceback; the report is written all or none)
        fix = "free space or " if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        print(f"flf2v-bench: error: {e.strerror or e} ({e.filename or args.out}); {fix}choose another --out or "
              f"--work; no report was written", file=sys.stderr)
        return 2
    finally:
        session.close()
    if paths:
        if not args.quiet:
            print(paths["md"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    if report and report.failed:  # the report says why; a failed backend exited 0 before
        print(f"flf2v-bench: error: {', '.join(report.failed)} failed; see {paths['md']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
