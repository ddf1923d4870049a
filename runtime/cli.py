"""`flf2v-run`: prompt + first frame + last frame -> mp4, with the official generate.py flag names.

One video over several processes (GPUs): `torchrun --nproc_per_node N --no-python flf2v-run ...
--ulysses_size U [--cfg_parallel] [--dit_fsdp] [--t5_fsdp]` (N = U, or 2U with --cfg_parallel;
runtime/parallel.py). The flags and their checks are runtime/cli_args.py's, the run's settings
runtime/request.py's, the choice of backend runtime/choose.py's; here: the order of it all, the one-line
errors and the report."""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flf2v import log

from .choose import describe_parallel, make_pipeline
from .cli_args import build_parser, check_args, check_device, check_model, request_options


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


def _stopped(e: KeyboardInterrupt, job: "Job") -> int:
    """Ctrl-C or SIGTERM (log.stop_said): said once, by rank 0."""
    said, code = log.stop_said(e)
    return _fail(f"{said}; {_outcome(job)}", code, every_rank=False)


def _outcome(job: "Job") -> str:
    """What a run that failed or was stopped left: it said "no video was written" of one stopped (or whose
    "wrote" line met a closed pipe) right after the video was."""
    if not job.written:
        return "no video was written"
    unwritten = f"; --metrics {job.args.metrics} was not written" if job.args.metrics and len(job.written) < 2 else ""
    return f"{job.written[0]} was written{unwritten}"


def _collective_failure(e: RuntimeError) -> bool:
    """torch.distributed's own errors, and gloo's, which come as plain RuntimeErrors naming gloo."""
    return isinstance(e, torch.distributed.DistError) or any(k in str(e) for k in ("gloo", "NCCL", "Connection"))


class Stopped(BaseException):  # as KeyboardInterrupt: no `except Exception` on the way turns it into another error
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
    from .media import replacing
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, default=str))


@dataclass
class Job:
    """One flf2v-run: its flags, and what the run made (for the report)."""
    args: argparse.Namespace
    t0: float = field(default_factory=time.perf_counter)
    par: object = None  # runtime/parallel.py Parallel in a torchrun job
    device: torch.device | None = None
    pipe: object = None
    video: torch.Tensor | None = None
    save: Path | None = None
    written: list = field(default_factory=list)  # the video, then the metrics, once each is on disk
    t_load: float = 0.0
    checkpoint: dict = field(default_factory=dict)  # layout and stored dtypes (models/fingerprint.describe)
    local: bool = False  # checking what a torchrun job's ranks may not share (files): every rank says its error
    plan_fits: bool = True  # --plan: whether a plan fits the card

    def run(self) -> None:
        """Every check before anything loads, then load, generate and save."""
        from flf2v.models import checkpoint as ck
        from flf2v.models.fingerprint import describe

        from . import parallel as P
        from .media import load_image, save_video
        from .request import make_request, size_hw
        args = self.args
        check_args(args)
        preset = ck.preset_for(args.ckpt_dir)
        check_model(args, preset)
        self.local = True  # files and devices: each node has its own, so a rank's error here is its alone
        ck.load_tokenizer(args.ckpt_dir, preset)  # a damaged one said now, not after the weights (cached for the run)
        ck.check_files(args.ckpt_dir, preset)
        self.checkpoint = describe(args.ckpt_dir)
        if _rank() == 0:  # said as the backend line is, under --quiet too
            dtypes = ", ".join(f"{k} {v}" for k, v in self.checkpoint["dtypes"].items())
            print(f"flf2v-run: checkpoint {args.ckpt_dir}: {self.checkpoint['layout']} layout, {preset.name} "
                  f"({dtypes})", flush=True)
        self.device = check_device(args.device)
        first = load_image(args.first_frame) if args.first_frame else None  # None: --plan of a size alone
        last = load_image(args.last_frame) if args.last_frame else None
        self.local = False
        options = request_options(args)
        hw = (first.height, first.width) if first else size_hw(preset, args.size)
        # the run's settings, with no backend yet (a static engine folder's shape is checked when it is chosen);
        # its warnings are the run's own request's too, said there (each was said twice)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prompt = "--plan" if args.prompt is None else args.prompt  # None only with --plan (check_args)
            req = make_request(preset, prompt, hw, last is not None if first else
                               preset.dit.model_type == "flf2v", ckpt_dir=args.ckpt_dir,
                               cfg_parallel=args.cfg_parallel, **options)
        shape = (req.height, req.width, req.frame_num)
        if args.plan:  # the table, then nothing loads; under torchrun once, by rank 0
            from .choose import plan_table
            # exit 2 where none fits, as the run would be refused: `--plan` answers "will it fit?" in scripts too
            self.plan_fits = _rank() != 0 or plan_table(args, preset, hw, *shape, self.device)
            return
        t_load = time.perf_counter()
        if P.world_from_env()[1] > 1:
            signal.signal(signal.SIGTERM, _on_sigterm)
            self.par = P.init(args.ulysses_size, args.cfg_parallel, self.device, args.dist_timeout, args.ring_size)
            self.device = self.par.device
            args.quiet = args.quiet or not self.par.is_main
        self.pipe = make_pipeline(args, preset, self.device, hw, self.par, shape)
        self.t_load = time.perf_counter() - t_load
        if self.pipe.memory_plan is not None:
            options["cfg_batch"] = self.pipe.memory_plan.cfg_batch
        self.video = self.pipe.generate(args.prompt, first, last, progress=not args.quiet, **options)
        if log.ctrl_c_lost():  # a Ctrl-C that landed in a __del__ during the run (flf2v.log.keep_ctrl_c)
            raise KeyboardInterrupt
        if self.video is not None:  # rank 0 of a torchrun job, or the one process
            v = self.video
            self.save = Path(args.save_file) if args.save_file else default_save_file(
                args.task, f"{v.shape[3]}*{v.shape[2]}", args.prompt)
            with self.pipe.times("save"):
                save_video(v, self.save, fps=args.fps)
            self.written.append(self.save)

    def report(self) -> int:
        """The metrics file and the "wrote ..." line (every rank its own memory)."""
        args, pipe, par, video = self.args, self.pipe, self.par, self.video
        total = time.perf_counter() - self.t0
        mem = peak_memory(self.device, pipe.times.device_used)
        mem_s = ", ".join(f"{k} {v:.2f}" for k, v in mem.items())
        if par is not None and not par.is_main:  # every rank reports its own memory; rank 0 the rest
            print(f"flf2v-run: rank {par.rank}: peak memory: {mem_s}", flush=True)
            return 0
        if args.metrics:
            try:
                write_metrics(args.metrics, self.metrics(total, mem))
                self.written.append(args.metrics)
            except OSError as e:  # checked before the run; the disk may still fill
                return _fail(f"{e.strerror or e} ({args.metrics}); {_outcome(self)}")
        cached = ""
        if pipe.last_cache:
            c = pipe.last_cache.to_json()
            cached = f", {c['method']} computed {c['steps_computed']} of {len(pipe.last_cache.compute)} steps"
        print(f"wrote {self.save} ({video.shape[1]} frames {video.shape[3]}x{video.shape[2]}, seed {pipe.seed}"
              f"{cached}) in {total:.1f} s; peak memory{' (rank 0)' if par else ''}: {mem_s}", flush=True)
        if pipe.preset.name.startswith("tiny") or pipe.preset.name == "small":
            real = "Wan2.1-FLF2V-14B-720P" if pipe.preset.dit.model_type == "flf2v" else "Wan2.1-I2V-14B-720P"
            print(f"note: {args.ckpt_dir} is a {pipe.preset.name} test checkpoint with random weights, so the video "
                  f"is noise. For real videos pass --ckpt_dir of {real}.")
        return 0

    def metrics(self, total: float, mem: dict) -> dict:
        # the stages add up to the end-to-end time: "other" is Python's imports and the checks before anything
        # loads (the checkpoint's headers and shapes, the tokenizer, the images)
        pipe, par, folder = self.pipe, self.par, self.pipe.backend.folder
        seconds = {"load": self.t_load, **pipe.times.seconds}
        seconds["other"] = total - sum(seconds.values())
        return {"save_file": str(self.save), "seconds": seconds, "end_to_end_s": total, "memory": mem,
                "cuda_device_used_gib": {k: v / 2**30 for k, v in pipe.times.device_used.items()},
                "run": pipe.last_request.to_json(), "fps": self.args.fps, "backend": self.args.backend,
                "quant": pipe.backend.quant, "loras": [{"path": str(lo.path), "fingerprint": lo.fingerprint,
                                                        "scale": s} for lo, s in pipe.backend.loras],
                "memory_plan": pipe.memory_plan.to_json() if pipe.memory_plan is not None else None,
                "engines": str(folder) if folder is not None else None, "device": str(self.device),
                "preset": pipe.preset.name, "checkpoint": {"dir": self.args.ckpt_dir, **self.checkpoint},
                "versions": versions(), "args": vars(self.args),
                **({"parallel": {"processes": par.world, "layout": describe_parallel(self.args)}} if par else {}),
                **({"cache": pipe.last_cache.to_json()} if pipe.last_cache else {})}


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    warnings.showwarning = _say_warning
    log.setup(-1 if args.quiet else args.verbose, "flf2v-run")
    from flf2v.export.manifest import EngineError
    from flf2v.models.checkpoint import CheckpointError
    from flf2v.models.lora import LoRAError

    from . import parallel as P
    from .denoise import NumericalError
    from .media import FrameError, InputError
    job = Job(args)
    try:
        with log.sigterm_as_ctrl_c():  # kill, docker stop: as Ctrl-C (a torchrun job's processes: Stopped)
            job.run()
        if args.plan:
            return 0 if job.plan_fits else 2
        return job.report()
    except InputError as e:
        return _fail(str(e), every_rank=job.local or isinstance(e, FrameError))
    except (CheckpointError, NumericalError, EngineError, LoRAError) as e:  # may be one rank's (its shard)
        return _fail(str(e))
    except KeyboardInterrupt as e:  # the video is written atomically: nothing half-written is left
        return _stopped(e, job)
    except Stopped:
        return _fail(f"stopped: another process of this torchrun job failed (see its line above); {_outcome(job)}",
                     1)
    except RuntimeError as e:  # a peer died (connection reset) or hung past --dist_timeout; else a bug
        if stop := log.ctrl_c(e):  # a Ctrl-C inside a torch context manager surfaces as its cleanup's RuntimeError
            return _stopped(stop, job)
        if job.par is None or not _collective_failure(e):
            raise
        msg = str(e).strip().splitlines()[0][:200]
        return _fail(f"a collective with the other processes failed ({msg}); another process died or hung "
                     f"(--dist_timeout {args.dist_timeout:g} s); {_outcome(job)}", 1)
    except OSError as e:  # disk full, permissions; a closed pipe under the "wrote" line
        return _fail(f"{e.strerror or e} ({e.filename or 'output'}); {_outcome(job)}")
    finally:
        if job.par is not None:  # the networks first: FSDP's hold the process group (runtime/parallel.py shutdown)
            job.pipe = None
            P.shutdown(job.par)


if __name__ == "__main__":
    sys.exit(main())
