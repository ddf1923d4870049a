"""`flf2v-build`: checkpoint -> ONNX graphs -> engines in one folder per target, build and shape, with a manifest.

    flf2v-build --ckpt_dir CKPT [--preset dynamic|720p|WxHxF] [--precision bf16|fp32] [--backend auto|ort|trt|aoti]
                [--out DIR] [--opt_level 3] [--cfg_batch 1|2|both] [--graphs t5,clip,...]
                [--attention onnx|plugin|sage] [--quant none|fp8] [--weight_streaming] [--lora PATH[:SCALE]] [--force]

Targets: with TensorRT and a CUDA GPU, `engines/<gpu>-sm<cc>-trt<major.minor>/<key>/<shape>/` (for example
`engines/h100-sm90-trt11.4/flf2v-14B-bf16-3f9a2c1b/dynamic/`) holding `<graph>.onnx` and the `<graph>.engine`
built from it (export/trt_engine.py); otherwise `engines/cpu-ort<onnxruntime version>/<key>/<shape>/`, where
the fp32 `<graph>.onnx` files are the engines ONNX Runtime opens. `--backend aoti` compiles each graph with
PyTorch's AOTInductor instead (export/aoti.py; no ONNX): `engines/<gpu>-sm<cc>-aoti-torch<x.y>/<key>/<shape>/
<graph>.pt2` on a GPU (bf16), `engines/cpu-aoti-torch<x.y>/...` on a CPU (fp32). The build key
(`<model>-<precision>-<checkpoint fingerprint>[-lora<set>]`, export/manifest.py) keeps two checkpoints,
precisions or LoRA sets apart; a build into a folder holding another one's engines (`--out`) is refused
unless `--force` (which also rebuilds current engines).
Shapes (export/contracts.py): `dynamic`, the default, serves every official size and first-frame aspect
ratio from 1:2.4 to 2.4:1 and 5..81 frames with one build (DiT and VAE graphs with dynamic latent frames,
height and width; TensorRT optimization profiles for landscape and portrait grids); `dynamic-480p` only
the 480p area (smaller TensorRT activation memory); a static shape (`720p`, `480p-portrait`, ... or any
`<W>x<H>x<frames>`) serves that one video shape, where TensorRT may pick faster tactics. Shapes live side
by side. `--attention plugin` (CUDA GPU) builds the DiT with the fused Triton attention kernels instead of
the backend's own attention (`onnx`, the default): as TensorRT plugins (export/plugins.py,
kernels/trt_plugin.py) or, with `--backend aoti`, compiled into the package (kernels/ops.py triton_ops),
under `engines/<target>-plugin/<key>/<shape>/`; `--attention sage` the same with the 8-bit self-attention
(TensorRT: export/sage_graph.py's quantization ops and the sage plugin), under `engines/<target>-sage/`.
`--quant fp8`: FP8 block linears (models/quant.py, export/qdq.py), key `<model>-<precision>-fp8-<checkpoint>`;
`--weight_streaming`: DiT blocks streamed (`-stream`; TensorRT or export/aoti_stream.py). Folder layout, manifest
schema, fingerprints: export/manifest.py. An engine whose entry's `key` (contract, precision, checkpoint and code
fingerprints, tool versions, builder options, GPU, attention, kernels' code) matches and whose files have the
recorded sizes is current and skipped. Files are written under temporary names and renamed; the
manifest is rewritten atomically per engine: a killed or interrupted (Ctrl-C: exit 130) build keeps what it finished
and redoes the rest. Two builds into one folder serialise on `.lock`."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from flf2v.log import logger
from flf2v.models import checkpoint as ck
from flf2v.models.fingerprint import describe
from flf2v.models.layouts import ckpt_dir_of
from flf2v.models.quant import QUANTS

from . import contracts as C
from . import manifest as M
from .build_args import BuildError, build_parser, check_inside, check_out
from .plugins import ATTENTION

ROOT = Path(__file__).resolve().parents[1]
CODE_FILES = ("models/config.py", "models/checkpoint.py", "models/dit.py", "models/t5.py", "models/clip.py",
              "models/vae.py", "models/quant.py", "export/contracts.py", "export/onnx_export.py", "export/passes.py",
              "export/qdq.py", "export/aoti.py", "export/aoti_stream.py")
# baked into plugin engines: their DiT keys hash these too
KERNEL_FILES = ("export/plugins.py", "export/sage_graph.py", "kernels/common.py", "kernels/attention.py",
                "kernels/cross_attention.py", "kernels/trt_plugin.py", "kernels/sage_attention.py")


def code_fingerprint(files=CODE_FILES) -> str:
    h = hashlib.sha256()
    for rel in files:
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()[:32]


def file_sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 23):
                h.update(chunk)
    return h.hexdigest()


def tool_versions(backend: str) -> dict:
    import torch
    if backend == "aoti":
        return {"torch": torch.__version__, "device": "cuda" if _on_gpu(backend) else "cpu"}
    import onnx
    v = {"torch": torch.__version__, "onnx": onnx.__version__, "opset": C.OPSET}
    if backend == "ort":
        import onnxruntime
        v["onnxruntime"] = onnxruntime.__version__
    else:
        import polygraphy
        import tensorrt
        v["tensorrt"], v["polygraphy"] = tensorrt.__version__, polygraphy.__version__
    return v


def is_current(entry: dict | None, key: str, folder: Path) -> bool:
    if not entry or entry.get("key") != key:
        return False
    return all((folder / n).is_file() and (folder / n).stat().st_size == size for n, size in entry["files"].items())


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Exclusive use of `folder`; a second build waits for the first, then finds its engines current."""
    with open(folder / ".lock", "w") as f:
        for attempt in range(6):  # a run's look (manifest.building) holds it for an instant: not a build
            time.sleep(0.05 * attempt)
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
        else:
            print(f"flf2v-build: waiting for another build into {folder} to finish", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(folder: Path) -> None:
    """Temporary files of killed builds (only ever named with a leading dot)."""
    for p in folder.glob(".*"):
        if ".partial-" in p.name or ".tmp-" in p.name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ---- the build -------------------------------------------------------------------------------------

def _on_gpu(backend: str) -> bool:
    from .aoti import aoti_device
    return backend == "trt" or (backend == "aoti" and aoti_device().type == "cuda")


def check_quant(backend: str, quant: str) -> None:
    """BuildError unless `backend` runs FP8 GEMMs here: TensorRT and CUDA AOTInductor on sm89+ (Ada, Hopper),
    AOTInductor and ONNX Runtime on the CPU (ONNX Runtime's CUDA provider has no FP8 GEMM)."""
    if quant not in QUANTS:
        raise BuildError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    if quant == "none":
        return
    if backend == "ort" and M.ort_cuda_available():
        raise BuildError("--quant fp8: ONNX Runtime's CUDA provider has no FP8 GEMM; use --backend trt on an sm89+ "
                         "GPU (Ada, Hopper), or build fp32 ONNX Runtime engines on a CPU")
    info = M.gpu_info() if _on_gpu(backend) else None
    if info is not None and tuple(info[1]) < (8, 9):
        raise BuildError(f"--quant fp8 needs FP8 tensor cores (sm89+: Ada, Hopper); this {info[0]} is "
                         f"sm{info[1][0]}{info[1][1]}: build without --quant")


def resolve_backend(backend: str, attention: str) -> str:
    if backend == "auto":
        if not M.trt_available() and M.gpu_info() is not None:
            # fp32 CPU engines of a 14B model are never what a GPU user wants: stop instead
            raise BuildError(f"a CUDA GPU is present but TensorRT is not importable; {M.TRT_INSTALL}, or pass "
                             f"--backend ort for fp32 ONNX Runtime engines")
        backend = "trt" if M.trt_available() else "ort"
    elif backend == "trt" and not M.trt_available():
        raise BuildError(f"--backend trt needs TensorRT and a CUDA GPU; {M.TRT_INSTALL} on a GPU machine, "
                         f"or use --backend ort")
    if attention not in ATTENTION:
        raise BuildError(f"--attention {attention}: choose one of {', '.join(ATTENTION)}")
    if attention != "onnx" and backend == "ort":
        raise BuildError(f"--attention {attention} needs TensorRT or AOTInductor on a CUDA GPU (--backend trt|aoti): "
                         f"the plugin nodes run the Triton kernels, which ONNX Runtime cannot; use --attention onnx"
                         + (" (or flf2v-run --backend torch --attention sage)" if attention == "sage" else ""))
    if attention != "onnx" and backend == "aoti" and not _on_gpu(backend):
        # the interpreter's kernels cannot be traced (kernels/ops.py): a CPU package cannot hold them
        raise BuildError(f"--backend aoti --attention {attention} compiles the Triton kernels into the packages, "
                         f"which needs a CUDA GPU; on this CPU use --attention onnx (C++ attention kernels)")
    return backend


class Plan:
    """Everything that decides an engine's key: one build's settings, fingerprints and tool versions."""

    def __init__(self, ckpt_dir: Path, preset, eshape: C.EngineShape | C.DynamicShape, precision: str, backend: str,
                 opt_level: int, attention: str, loras=(), quant: str = "none", weight_streaming: bool = False):
        self.ckpt_dir, self.preset, self.eshape, self.precision = ckpt_dir, preset, eshape, precision
        self.weight_streaming = weight_streaming
        self.backend, self.opt_level, self.attention, self.quant = backend, opt_level, attention, quant
        self.loras = list(loras)  # [(models.lora.LoRA, scale)], merged into the DiT at export
        info = M.gpu_info() if _on_gpu(backend) else None
        self.gpu = {"name": info[0], "compute_capability": f"{info[1][0]}.{info[1][1]}"} if info else None
        self.fingerprint = M.checkpoint_fingerprint(ckpt_dir)
        self.code = code_fingerprint()
        self.kernels = code_fingerprint(KERNEL_FILES) if attention != "onnx" else None
        self.builder = {"backend": backend, **tool_versions(backend),
                        **({"opt_level": opt_level} if backend == "trt" else {})}

    def dit_options(self, g: C.Graph) -> dict:
        """What the attention, quant and weight-streaming options add to a graph's key and manifest entry (DiT
        graphs only; weight streaming only when on, so the keys of other builds stay as they were)."""
        streaming = {"weight_streaming": True} if self.weight_streaming else {}
        return {"attention": self.attention, "quant": self.quant, **streaming} if g.component == "dit" else {}

    def graph_attention(self, g: C.Graph) -> str:
        """The attention a graph is exported with: the cached DiT step has none (it skips the blocks)."""
        return "onnx" if g.name.startswith("dit_cached") else self.dit_options(g).get("attention", "onnx")

    def graph_quant(self, g: C.Graph) -> str:
        return self.dit_options(g).get("quant", "none")

    def key(self, g: C.Graph) -> str:
        spec = {"graph": g.name, "inputs": [s.to_json() for s in g.inputs], "outputs": [s.to_json() for s in g.outputs],
                "precision": self.precision, "checkpoint": self.fingerprint, "code": self.code,
                "builder": self.builder, "gpu": self.gpu, "profiles": self.profiles_json(g)}
        if self.dit_options(g):  # a DiT engine of the other attention, quant or LoRAs is never current
            spec.update(kernels=self.kernels, loras=self.loras_json(), **self.dit_options(g))
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]

    def profiles(self, g: C.Graph) -> list[tuple[dict, dict, dict]] | None:
        """TensorRT optimization profiles of a dynamic graph: (min, opt, max) root dims per profile."""
        if not g.dynamic:
            return None
        return [tuple(dict(zip(C.DIMS, d)) for d in (p.min, p.opt, p.max)) for p in self.eshape.profiles]

    def profiles_json(self, g: C.Graph) -> list | None:
        return None if not g.dynamic else [p.to_json() for p in self.eshape.profiles]

    def loras_json(self) -> list[dict]:
        return [{"path": str(lora.path), "fingerprint": lora.fingerprint, "scale": scale} for lora, scale in self.loras]

    def manifest(self, engines: dict) -> dict:
        return {"schema": M.SCHEMA, "target": M.target_tag(self.backend), "backend": self.backend,
                "model_preset": self.preset.name, "model_type": self.preset.dit.model_type,
                "precision": self.precision, "attention": self.attention, "quant": self.quant,
                "shape": self.eshape.to_json(self.preset),
                "checkpoint": {"dir": str(self.ckpt_dir.resolve()), "fingerprint": self.fingerprint,
                               **describe(self.ckpt_dir)},
                "loras": self.loras_json(), "gpu": self.gpu, "engines": engines,
                **({"weight_streaming": True} if self.weight_streaming else {})}

    def build_one(self, g: C.Graph, folder: Path) -> dict:
        """Export `g` (and build its TensorRT engine, or compile its AOTInductor package); its manifest entry."""
        from .onnx_export import export_graph
        t0 = time.perf_counter()
        dit = g.component == "dit"
        if self.backend == "aoti":
            from .aoti_stream import compile_graph
            paths = compile_graph(g, self.ckpt_dir, folder, self.preset, self.loras, self.graph_attention(g),
                                  self.graph_quant(g), self.eshape.envelope() if g.dynamic else None,
                                  streamed=self.weight_streaming and g.name.startswith("dit_b"))
            parts = {p: path.name for p, path in paths.items() if p}
            return {"file": paths.get("block", paths.get("")).name, "inputs": [s.to_json() for s in g.inputs],
                    "outputs": [s.to_json() for s in g.outputs], "precision": self.precision,
                    "checkpoint_fingerprint": self.fingerprint, "builder": self.builder, "gpu": self.gpu,
                    "files": {path.name: path.stat().st_size for path in paths.values()}, "key": self.key(g),
                    **({"parts": parts} if parts else {}),
                    "seconds": round(time.perf_counter() - t0, 1), "profiles": self.profiles_json(g),
                    **self.dit_options(g), **({"loras": self.loras_json()} if dit else {})}
        source = None
        if dit and self.loras:
            from flf2v.models.lora import merged_source
            source = merged_source(ck.tensor_source(self.ckpt_dir, "dit")[0], self.loras)
        # The DiT always takes the streamed route: its initializers keep the checkpoint's key names
        # ("net." + key), which is what a LoRA swap at run time overrides (runtime/engine_backend.py).
        onnx_path = export_graph(g, self.ckpt_dir, folder / f"{g.name}.onnx", preset=self.preset,
                                 attention=self.graph_attention(g), stream=True if dit else None,
                                 source=source, ranges=self.eshape.envelope() if g.dynamic else None,
                                 quant=self.graph_quant(g))
        files = [onnx_path] + [p for p in [onnx_path.with_name(onnx_path.name + ".data")] if p.exists()]
        onnx_sha = file_sha256(*files)
        engine = onnx_path
        if self.backend == "trt":
            from .trt_engine import build_trt_engine
            engine = folder / f"{g.name}.engine"
            build_trt_engine(onnx_path, engine, g, self.opt_level, folder / "timing.cache", self.profiles(g),
                             weight_streaming=dit and self.weight_streaming)
            files.append(engine)
        return {"file": engine.name, "onnx": onnx_path.name, "onnx_sha256": onnx_sha,
                "inputs": [s.to_json() for s in g.inputs], "outputs": [s.to_json() for s in g.outputs],
                "precision": self.precision, "checkpoint_fingerprint": self.fingerprint, "builder": self.builder,
                "gpu": self.gpu, "files": {f.name: f.stat().st_size for f in files}, "key": self.key(g),
                "seconds": round(time.perf_counter() - t0, 1), "profiles": self.profiles_json(g),
                **self.dit_options(g), **({"loras": self.loras_json()} if dit else {})}


def _settings(ckpt_dir: Path, shape, precision, backend: str, attention: str, loras, quant: str = "none"):
    """(preset, engine shape, backend, precision, loras) of a build, each checked: BuildError in one line."""
    if not ckpt_dir.is_dir():
        raise BuildError(f"--ckpt_dir {ckpt_dir}: no such directory")
    try:
        preset = ck.preset_for(ckpt_dir)
        eshape = C.get_shape(preset, shape)
        ck.check_files(ckpt_dir, preset)
    except (ck.CheckpointError, ValueError) as e:
        raise BuildError(str(e)) from None
    backend = resolve_backend(backend, attention)
    check_quant(backend, quant)
    if loras:
        from flf2v.models.lora import LoRAError, load_loras
        try:
            loras = load_loras(loras, ckpt_dir)
        except LoRAError as e:
            raise BuildError(str(e)) from None
    precision = precision or ("bf16" if _on_gpu(backend) else "fp32")
    if backend == "aoti" and precision != "fp32" and not _on_gpu(backend):
        raise BuildError(f"--precision {precision}: AOTInductor packages on the CPU are fp32 (bf16 needs a CUDA "
                         f"GPU); use --precision fp32")
    if backend == "ort" and precision != "fp32" and not M.ort_cuda_available():
        raise BuildError(f"--precision {precision}: ONNX Runtime on the CPU runs fp32 graphs only; use "
                         f"--precision fp32 (bf16 engines need TensorRT, or onnxruntime-gpu: make setup ORT=gpu)")
    return preset, eshape, backend, precision, loras


def _graphs_to_build(all_graphs, only: list[str] | None, cfg_batch) -> list:
    names = [g.name for g in all_graphs]
    for n in [""] if only == [] else only or ():  # an empty --graphs names no graph, not "all of them"
        if n not in names:
            raise BuildError(f"--graphs: unknown graph {n!r}; choose from {', '.join(names)}")
    # each DiT layout with its cached step (runtime/cache.py); --graphs, when given, names the DiT graphs itself
    dits = {f"dit{kind}_b{b}" for b in cfg_batch for kind in ("", "_cached")}
    return [g for g in all_graphs if (g.name in only if only else g.component != "dit" or g.name in dits)]


def build(ckpt_dir, shape: str | None = None, precision: str | None = None, out=None, backend: str = "auto",
          opt_level: int = 3, cfg_batch=(2,), only: list[str] | None = None, progress: bool = True,
          attention: str = "onnx", loras=(), force: bool = False, quant: str = "none",
          weight_streaming: bool = False, built: list | None = None) -> Path:
    """Build (or find current) every engine of one folder; returns the folder. `attention` ("onnx",
    "plugin" or "sage"; the last two on a CUDA GPU) picks the DiT's attention: the backend's own, the flf2v
    Triton kernels, or the 8-bit self-attention.
    `loras`: (path, scale) pairs or "PATH[:SCALE]" strings merged into the DiT (models/lora.py). A folder
    holding the engines of another build (backend, model, checkpoint, precision, attention, shape, LoRA set)
    is refused unless `force`. `quant` "fp8": the DiT's block linears in FP8 (models/quant.py).
    `weight_streaming`: a DiT whose weights the runtime streams from host memory as its memory plan sets
    (runtime/memory_plan.py): TensorRT's weight streaming, or AOTInductor block packages (export/aoti_stream.py).
    `built`: a list the names of the graphs built now are appended to."""
    ckpt_dir = Path(ckpt_dir)
    if out is not None:  # before the checkpoint's fingerprint (seconds): a wrong --out was refused 8-13 s in
        check_out(out, ckpt_dir)
    preset, eshape, backend, precision, loras = _settings(ckpt_dir, shape, precision, backend, attention, loras,
                                                          quant)
    if weight_streaming and backend not in ("trt", "aoti"):
        raise BuildError(f"--weight_streaming (STREAM=1) builds TensorRT engines (BuilderFlag.WEIGHT_STREAMING) or "
                         f"AOTInductor packages (--backend aoti) whose DiT blocks stream; this build is {backend}: "
                         f"add --backend aoti (BACKEND=aoti), build on a GPU with TensorRT, or drop it")
    all_graphs = C.graphs(preset, eshape, precision, cfg_batch=(1, 2))
    todo = _graphs_to_build(all_graphs, only, cfg_batch)

    plan = Plan(ckpt_dir, preset, eshape, precision, backend, opt_level, attention, loras, quant, weight_streaming)
    key = M.build_key(preset.name, precision + ("" if quant == "none" else f"-{quant}") + (
        "-stream" if weight_streaming else ""), plan.fingerprint, plan.loras_json())
    folder = Path(out) if out else M.default_folder(backend, eshape.name, attention, key)
    check_inside(folder, ckpt_dir)  # the default folder too: relative, it lies in the checkpoint run from there
    if not force and folder.is_dir():  # all current: nothing written, no lock (a read-only share of engines)
        prior = M.load(folder)
        manifest = _kept(plan, prior, all_graphs, todo, folder, force)
        if all(g.name in manifest["engines"] for g in todo) and _same(manifest, prior):
            _build_missing(plan, folder, manifest, todo, progress, built)
            return folder
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        _remove_leftovers(folder)
        prior = M.load(folder)
        other = M.holds_other(prior, plan.manifest({}))
        if other and not force:
            raise BuildError(f"{folder} holds the engines of another build ({other}); this build would replace "
                             f"them: leave out --out (ENGINES=) for a folder of its own, or add --force (FORCE=1) "
                             f"to replace them")
        old = prior.get("engines", {})
        manifest = _kept(plan, prior, all_graphs, todo, folder, force)
        logger.info("%s: %s %s engines of %s (%s), key %s", folder, backend, precision, preset.name, eshape.name,
                    key)
        for name, entry in old.items():  # engines of another checkpoint, shape or precision: gone
            if name not in manifest["engines"]:
                logger.debug("%s: not current, its files removed: %s", name, ", ".join(entry.get("files", {})))
                for f in entry.get("files", {}):
                    (folder / f).unlink(missing_ok=True)
        if json.loads(json.dumps(manifest)) != prior:  # a current folder is left untouched: runs, copies read it
            M.write(folder, manifest)
        _build_missing(plan, folder, manifest, todo, progress, built)
    return folder


def _same(manifest: dict, prior: dict) -> bool:
    """The manifest as written but for the checkpoint's path and layout (a copy of it reads the same engines)."""
    def bare(m):
        c = m.get("checkpoint")
        return {**m, "checkpoint": c.get("fingerprint") if isinstance(c, dict) else c}
    return bare(json.loads(json.dumps(manifest))) == bare(prior)


def _kept(plan: Plan, prior: dict, all_graphs, todo, folder: Path, force: bool) -> dict:
    """The manifest of the engines of `prior` to keep: current by key and file sizes (`force`: none of `todo`)."""
    old = prior.get("engines", {})
    return plan.manifest({g.name: old[g.name] for g in all_graphs if not (force and g in todo)
                          and is_current(old.get(g.name), plan.key(g), folder)})


def _build_missing(plan: Plan, folder: Path, manifest: dict, todo: list, progress: bool, built=None) -> None:
    """Build the graphs of `todo` the manifest lacks, rewriting it after each (a killed build keeps them)."""
    from tqdm.auto import tqdm
    for g in todo:
        if g.name in manifest["engines"]:
            logger.info("%s: current, kept", g.name)
    missing = [g for g in todo if g.name not in manifest["engines"]]
    # over the graphs to build alone: the kept ones' instant steps read as "172960.99graph/s"
    bar = tqdm(missing, desc="engines", unit="graph", disable=not progress or not missing)
    for g in bar:
        bar.set_postfix_str(g.name)
        logger.info("%s: %s", g.name, "compiling" if plan.backend == "aoti" else "exporting"
                    + (" and building" if plan.backend == "trt" else ""))
        entry = manifest["engines"][g.name] = plan.build_one(g, folder)
        if built is not None:
            built.append(g.name)
        logger.info("%s: done in %.1f s, %.3g MB", g.name, entry["seconds"], sum(entry["files"].values()) / 1e6)
        M.write(folder, manifest)


# ---- CLI -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm.contrib.logging import logging_redirect_tqdm

    from flf2v import log
    log.setup(-1 if args.quiet else args.verbose, "flf2v-build")
    only = [s.strip() for s in args.graphs.split(",") if s.strip()] if args.graphs is not None else None
    built: list[str] = []  # by this command (mtimes counted those another build wrote while this one waited)
    try:
        # -v: log lines above the progress bar, not inside it; SIGTERM as Ctrl-C here too (bench runs this main)
        with logging_redirect_tqdm([log.logger]), log.sigterm_as_ctrl_c():
            folder = build(ckpt_dir_of(args), args.preset, args.precision, args.out, args.backend, args.opt_level,
                           (1, 2) if args.cfg_batch == "both" else (int(args.cfg_batch),), only,
                           progress=not args.quiet, attention=args.attention, loras=args.lora, force=args.force,
                           quant=args.quant, weight_streaming=args.weight_streaming, built=built)
    except (BuildError, ck.CheckpointError, M.EngineError) as e:
        print(f"flf2v-build: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable --out, a full disk: said in one line, the folder's lock released
        fix = "free space or " if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""  # not for a read-only folder
        print(f"flf2v-build: error: {e.strerror or e} ({e.filename or args.out}); {fix}choose another --out",
              file=sys.stderr)
        return 2
    except BaseException as e:  # Ctrl-C: each engine lands whole (renamed into place), the finished stay current
        if not (stop := log.ctrl_c(e)):
            raise
        return log.stopped("flf2v-build", stop, "; the engines finished are kept, the same command "  # --force: all
                           f"{'without --force ' if args.force else ''}builds the rest")
    engines = M.load(folder).get("engines", {})
    # "8 engines current, 8 built now" read as 16 engines
    print(f"{folder}: {len(engines)} engine{'s' * (len(engines) != 1)} current: {len(built)} built now, "
          f"{len(engines) - len(built)} kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
