"""Which backend runs a `flf2v-run` job, and opening it: the engines given (`--engines`) or this machine's
(engines/<this machine>[-plugin]/) that serve the run, else the torch reference; one line saying what runs."""
from __future__ import annotations

import itertools
import shlex
import warnings
from pathlib import Path

import torch

from flf2v.log import logger

from .media import InputError
from .request import default_shape, output_shape


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

    from .backends import check_backend
    from .engine_folders import find_engines

    kind = args.backend
    if kind == "auto":  # the kind of the engines given, else what this machine runs
        given = [M.load(f).get("backend") for f in M.folders_under(args.engines)] if args.engines else []
        kind = given[0] if given and given[0] in ("ort", "trt", "aoti") else engine_kind(device)
    if kind == "torch":
        if args.engines:
            warnings.warn(f"--engines {args.engines} is not used: --backend torch runs the PyTorch reference")
        return "torch", None, None
    check_backend(kind, device)
    judges = _judges(args, preset, first_hw, loras)
    roots = [Path(args.engines)] if args.engines else [M.target_root(kind, a) for a in ("onnx", "plugin", "sage")]
    folder, unusable, others = find_engines(roots, args.ckpt_dir, preset, kind, *judges)
    for why in others + unusable:
        logger.debug("passed over: %s", why)
    if folder is not None:
        logger.info("engines %s serve this run", folder)
        if getattr(args, "dtype", None) and args.dtype != (built := M.load(folder).get("precision")):
            warnings.warn(f"--dtype {args.dtype} is not used: engines run in the precision they were built in "
                          f"({built}); --backend torch runs {args.dtype}")
        return kind, folder, None
    if args.engines and unusable and not others:
        raise M.EngineError(unusable[0])  # the folder given cannot serve this checkpoint: its reason and fix
    beside = None
    if args.engines and (Path(args.engines) / M.MANIFEST).is_file():  # one shape folder: one beside it may serve
        beside = find_engines([Path(args.engines).parent], args.ckpt_dir, preset, kind, *judges)[0]
    return "torch", None, _none_serve(args, preset, first_hw, kind, roots, others + unusable, loras, beside)


def _judges(args, preset, first_hw: tuple[int, int], loras):
    """(serves, prefer, why) of engine_folders.find_engines for this run."""
    from flf2v.export import manifest as M

    from . import loras as L
    from .engine_folders import engine_video_shape
    cfg_parallel = getattr(args, "cfg_parallel", False)  # each process runs the batch-1 DiT
    try:
        default = want(args, preset, first_hw, None)
    except InputError:
        default = None

    def serves(m) -> bool:
        if (cfg_parallel and "dit_b1" not in m.get("engines", {})) or m.get("quant", "none") != args.quant:
            return False
        try:
            return M.serves(m, preset, *want(args, preset, first_hw, engine_video_shape(m)))
        except (InputError, KeyError, TypeError, ValueError):
            return False

    def prefer(m) -> tuple[bool, bool]:
        # the run's LoRAs built in; then the model's default shape where --size / --frame_num are unset (they
        # take a static folder's own: with several, the video's length hung on the folders' names)
        return not L.needs_swap(m, loras), engine_video_shape(m) in (None, default)

    def why(m) -> str:  # a folder passed over (a quant mismatch was said as one of shape)
        if cfg_parallel and "dit_b1" not in m.get("engines", {}):
            return "holds no batch-1 DiT, which --cfg_parallel runs (build with --cfg_batch both)"
        if (quant := m.get("quant", "none")) != args.quant:
            return f"holds --quant {quant} engines, which --quant {quant} runs"
        return f"serves {M.describe(m)}"
    return serves, prefer, why


def want(args, preset, first_hw: tuple[int, int], fixed) -> tuple[int, int, int]:
    """(height, width, frames) of the run on a folder of shape `fixed` (None: dynamic): unset --size and
    --frame_num default to a static folder's own, else to the model's."""
    return output_shape(preset, first_hw, *default_shape(preset, args.size, args.frame_num, fixed))


def _none_serve(args, preset, first_hw, kind: str, roots, why: list[str], loras, beside=None) -> str:
    """No folder serves the run: EngineError naming the folder beside the one given that would (`beside`), else
    the build that would, when engines were asked for; else the note (with that build) that the torch reference
    runs instead."""
    from flf2v.export import manifest as M

    from . import loras as L
    from .engine_folders import build_serving
    cfg_parallel = getattr(args, "cfg_parallel", False)
    name = build_serving(preset, *want(args, preset, first_hw, None))
    root = Path(args.engines) if args.engines else None
    one_shape = root is not None and (root / M.MANIFEST).is_file()
    if one_shape:
        root = root.parent  # a shape folder was given: the new shape goes beside it
    out = None
    if root:  # a folder of its own: one holding another build (quant, LoRAs, backend) refused the hint's build
        names = itertools.chain([name], (f"{name}-{i}" for i in itertools.count(2)))
        out = next(root / n for n in names if not (root / n / M.MANIFEST).exists())
    fix = M.rebuild_hint(args.ckpt_dir, out, name, backend=kind,
                         loras=L.lora_arg(loras) if kind != "ort" or args.quant != "none" else (),  # ORT swaps them
                         cfg_batch="both" if cfg_parallel else None, quant=args.quant)
    if one_shape:  # that folder stays the only one the same command reads: the hint looped
        fix += f", then run with --engines {shlex.quote(str(root))}"
    if beside is not None:
        fix = f"{beside} serves it: run with --engines {shlex.quote(str(beside))}"
    run = (f"a {first_hw[1]}x{first_hw[0]} first frame" + (f", --size {args.size}" if args.size else "")
           + (f", {args.frame_num} frames" if args.frame_num else "")
           + (" with --cfg_parallel (the batch-1 DiT)" if cfg_parallel else "")
           + (f" with --quant {args.quant}" if args.quant != "none" else ""))
    if args.engines or args.backend != "auto":
        detail = f" ({why[0].split('; ')[0]})" if why else ""  # its own fix would be for its shape, not this run's
        raise M.EngineError(f"no {kind} engines in {args.engines or roots[0]} serve {run}{detail}; {fix}, "
                            f"or use --backend torch")
    return f"no current {kind} engines for this checkpoint serve {run} under {roots[0]}; {fix}"


def make_pipeline(args, preset, device: torch.device, first_hw: tuple[int, int], parallel=None, shape=None):
    """The run's Pipeline on the backend chosen (`args.backend` set to its kind); says which on stdout.
    `shape` (height, width, frames): the run's, for the torch backend's memory plan (`pipe.memory_plan`)."""
    from flf2v.export import manifest as M
    from flf2v.models import checkpoint as ck
    from flf2v.models.lora import load_loras

    from . import backends
    from .pipeline import Pipeline

    loras = load_loras(args.lora, args.ckpt_dir)  # checked before anything loads
    check_quant(args, device)
    check_attention(args, device)
    kind, folder, note = run_backend(args, preset, first_hw, device, loras)
    args.backend = kind
    plan, options = None, {}
    manifest = M.load(folder) if kind in ("trt", "aoti") else {}
    if kind == "torch" and shape is not None and parallel is None:
        plan = memory_plan(args, preset, *shape, device)
    elif manifest.get("weight_streaming") and shape is not None and parallel is None:
        plan = memory_plan(args, preset, *shape, device, engines=manifest)
        if plan is not None:  # TensorRT's streaming budget, or the blocks the aoti backend keeps on the device
            options = {"weight_budget": plan.dit_budget} if kind == "trt" else {"resident_blocks": plan.blocks}
    elif args.offload is not None or args.t5_cpu:
        raise _loads_whole(kind)
    if kind == "torch":
        backend, says = _torch_backend(args, preset, device, loras, parallel, plan)
        says += f"; {note}" if note else ""
    else:
        from flf2v.export.manifest import describe
        backend = backends.open_backend(kind, folder, args.ckpt_dir, preset, device, loras=loras, **options)
        quant = f" + {backend.quant}" if backend.quant != "none" else ""
        says = (f"backend {kind}, engines {folder} ({backend.manifest['precision']}{quant}, "
                f"{describe(backend.manifest)})")
    if loras:
        says += "; LoRAs " + ", ".join(f"{lo.path.name}:{scale:g}" for lo, scale in loras)
    if parallel is not None:
        says += f"; {parallel.world} processes: " + describe_parallel(args)
    if parallel is None or parallel.is_main:
        print(f"flf2v-run: {says}", flush=True)
        if plan is not None:
            print(f"flf2v-run: {plan.describe()}", flush=True)
    pipe = Pipeline(backend, ck.load_tokenizer(args.ckpt_dir, preset), preset, device, cuda_graph=args.cuda_graph,
                    parallel=parallel)
    pipe.memory_plan = plan
    return pipe


def run_backend(args, preset, first_hw: tuple[int, int], device: torch.device, loras):
    """(backend kind, engine folder or None, note) of the run: the torch reference for the torch-only layouts."""
    if args.ulysses_size > 1 or args.dit_fsdp or args.t5_fsdp:
        if args.backend not in ("auto", "torch"):
            raise InputError(f"--ulysses_size / --dit_fsdp / --t5_fsdp run on --backend torch (engines hold whole "
                             f"sequences and weights; README \"Several GPUs\"); use --backend torch, or "
                             f"--cfg_parallel alone with {args.backend} engines")
        return "torch", None, None
    return choose_engines(args, preset, first_hw, device, loras)


def _loads_whole(kind: str) -> InputError:
    return InputError(f"--offload / --t5_cpu apply to --backend torch (--offload also to trt or aoti engines built "
                      f"with flf2v-build --weight_streaming), but {kind} engines run this job; add --backend torch "
                      f"or drop them")


def check_quant(args, device: torch.device) -> None:
    """InputError unless this run can use `--quant`: FP8 GEMMs need sm89+ (Ada, Hopper) on CUDA; FSDP2 shards
    the checkpoint's weights as stored."""
    if args.quant == "none":
        return
    if args.dit_fsdp:
        raise InputError(f"--quant {args.quant} quantizes the DiT as it loads whole; drop --dit_fsdp (the FP8 DiT "
                         f"is half the bf16 bytes) or --quant")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise InputError(f"--quant {args.quant} needs FP8 tensor cores (sm89+: Ada, Hopper); this "
                         f"{torch.cuda.get_device_name(device)} has none: drop --quant")


def check_attention(args, device: torch.device) -> None:
    """InputError unless this run can use `--attention`: a run-time choice of --backend torch, the Triton
    kernels on CUDA (on a CPU only in the interpreter), the 8-bit kernel in one process."""
    import os
    if args.attention == "sdpa":
        return
    if args.backend not in ("auto", "torch"):
        raise InputError(f"--attention {args.attention} applies to --backend torch; engines hold the attention they "
                         f"were built with (flf2v-build --attention plugin); drop --attention or use --backend torch")
    if args.ulysses_size > 1 and args.attention == "sage":
        raise InputError("--attention sage runs in one process; with --ulysses_size use sdpa or triton")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputError(f"--attention {args.attention} runs Triton kernels: on a CUDA GPU, or on a CPU with "
                         f"TRITON_INTERPRET=1 set (slow, for tests); drop --attention here")
    args.backend = "torch"


def plan_table(args, preset, first_hw: tuple[int, int], height: int, width: int, frames: int,
               device: torch.device) -> bool:
    """`flf2v-run --plan`: the memory plans of the run printed, the one the run would take marked (the planning
    flags, and the engines the run would take, narrow them as they narrow the run's); nothing loaded. False where
    no plan fits."""
    from flf2v.export import manifest as manifests
    from flf2v.models.lora import load_loras

    from . import memory_plan as M
    loras = load_loras(args.lora, args.ckpt_dir)  # what the run would refuse, the table refuses
    check_quant(args, device)
    check_attention(args, device)
    kind, folder, _ = run_backend(args, preset, first_hw, device, loras)  # the table was the torch one's
    engines = manifests.load(folder) if folder else None
    streams = bool(engines and engines.get("weight_streaming"))
    if engines and not streams and (args.offload is not None or args.t5_cpu):
        raise _loads_whole(kind)
    allowed, what = _plan_filter(args, preset, engines)
    text, chosen = M.table(_video(args, preset, height, width, frames, device, engines), _gpu_bytes(args, device),
                           allowed=allowed, what=what)
    if engines:
        print(f"for the {kind} engines in {folder}" + ("" if streams else " (they load whole: only the offload "
                                                                           "plans run them)"))
    print(text)
    if device.type != "cuda" and args.gpu_memory is None:
        print("(no GPU here: planned for a card of this host's memory; --gpu_memory GiB plans for your card)")
    return chosen is not None


def _video(args, preset, height: int, width: int, frames: int, device: torch.device, engines=None):
    from . import memory_plan as M
    precision = engines["precision"] if engines else args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    return M.Video(preset, height, width, frames, 2 if precision == "bf16" else 4, args.quant)


def _gpu_bytes(args, device: torch.device) -> int:
    """What to plan for: --gpu_memory, else the GPU's free memory; on a CPU, a card as large as this host."""
    from . import memory_plan as M
    if args.gpu_memory is not None:
        return int(args.gpu_memory * M.GiB)
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else M.host_memory()


def _plan_filter(args, preset, engines=None):
    """(allowed(plan), the flags said for messages): the plans --offload_model, --t5_cpu and --offload leave, and
    for engines (manifest `engines`) those their DiT layouts run. InputError for a flag that cannot apply."""
    blocks = getattr(args, "offload_blocks", None)
    if engines is not None and args.t5_cpu:
        raise InputError("--t5_cpu applies to --backend torch; engines run T5 on the GPU and release it before the "
                         "DiT loads: drop --t5_cpu")
    if blocks is not None and not blocks < preset.dit.num_layers:
        raise InputError(f"--offload blocks:{blocks}: {preset.name} has {preset.dit.num_layers} blocks; keep fewer "
                         f"resident, or drop --offload")
    layouts = {int(g[len("dit_b"):]) for g in (engines or {}).get("engines", {}) if g.startswith("dit_b")}

    def allowed(p) -> bool:
        engine_ok = not engines or (p.offload_model and not p.t5_cpu and p.cfg_batch in layouts
                                    and (engines.get("weight_streaming") or p.blocks is None))
        # engines release the encoders before the DiT loads whatever --offload_model says (the run ignores it)
        return ((not args.t5_cpu or p.t5_cpu) and (engines is not None or args.offload_model is None
                                                   or p.offload_model == args.offload_model)
                and (args.offload is None or p.blocks is not None) and (blocks is None or p.blocks == blocks)
                and engine_ok)
    flags = [f for f, on in (("--t5_cpu", args.t5_cpu), (f"--offload {args.offload}", args.offload is not None),
                             (f"--offload_model {args.offload_model}", args.offload_model is not None)) if on]
    what = " with " + " ".join(flags) if flags else ""
    if engines is not None and 1 not in layouts:
        backend = f" --backend {engines['backend']}" if engines.get("backend") in ("aoti", "ort") else ""
        stream = " --weight_streaming" if engines.get("weight_streaming") else ""
        what += f" for these engines (DiT batch 2 only; flf2v-build{backend} --cfg_batch 1{stream} adds batch 1)"
    return allowed, what


def memory_plan(args, preset, height: int, width: int, frames: int, device: torch.device, engines=None):
    """The run's memory plan (runtime/memory_plan.py) on --backend torch, or for the engines (TensorRT or
    aoti) of manifest `engines` built with STREAM=1: planned for --gpu_memory, else on CUDA for the GPU's
    free memory; None on a CPU without planning flags (host and device are one memory). The flags
    --offload_model, --t5_cpu and --offload narrow the plans to those they name."""
    from . import memory_plan as M
    flags = args.offload is not None or args.t5_cpu or args.offload_model is not None
    if args.gpu_memory is None and device.type != "cuda" and not flags:
        return None
    allowed, what = _plan_filter(args, preset, engines)
    return M.choose(_video(args, preset, height, width, frames, device, engines), _gpu_bytes(args, device), allowed,
                    what=what)


def _torch_backend(args, preset, device: torch.device, loras, parallel, plan=None):
    """(TorchBackend, what it runs) of the flags."""
    from flf2v.export.contracts import COMPUTE_DTYPE

    from . import torch_backend
    precision = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    offload = device.type == "cuda" if args.offload_model is None else args.offload_model
    backend = torch_backend.TorchBackend(args.ckpt_dir, preset, COMPUTE_DTYPE[precision], device,
                                         offload_model=offload and not args.dit_fsdp, loras=loras,
                                         parallel=parallel, dit_fsdp=args.dit_fsdp, t5_fsdp=args.t5_fsdp,
                                         quant=args.quant, attention=args.attention, plan=plan)
    quant = f", DiT block linears {args.quant}" if args.quant != "none" else ""
    quant += f", attention {args.attention}" if args.attention != "sdpa" else ""
    return backend, f"backend torch (PyTorch reference, {precision}{quant} on {device})"


def describe_parallel(args) -> str:
    split = " x ".join(([f"Ulysses {args.ulysses_size}"] if args.ulysses_size > 1 else [])
                       + (["CFG-parallel"] if args.cfg_parallel else []))  # one of them: check_layout
    return ", ".join([split] + [f"{n} weights sharded (FSDP2)" for n, on in (("DiT", args.dit_fsdp),
                                                                            ("T5", args.t5_fsdp)) if on])
