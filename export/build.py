"""`flf2v-build`: checkpoint -> ONNX graphs -> engines in one folder per target, with a manifest.

    flf2v-build --ckpt_dir CKPT [--preset 720p] [--precision bf16|fp32] [--backend auto|ort|trt]
                [--out DIR] [--opt_level 3] [--cfg_batch 1|2|both] [--graphs t5,clip,...]
                [--attention onnx|plugin]

Targets: with TensorRT and a CUDA GPU, `engines/<gpu>-sm<cc>-trt<major.minor>/` (for example
`h100-sm90-trt10.15`) holding `<graph>.onnx` and the `<graph>.engine` built from it through polygraphy
(strongly typed, one static profile, timing cache `timing.cache` kept in the folder); otherwise
`engines/cpu-ort<onnxruntime version>/`, where the fp32 `<graph>.onnx` files are the engines ONNX Runtime
opens. A folder serves one checkpoint, one precision and one output grid (`shape` in the manifest).
`--attention plugin` (TensorRT only) builds the DiT with the fused Triton attention kernels as TensorRT
plugins (export/plugins.py, kernels/trt_plugin.py) instead of TensorRT's own attention (`onnx`, the
default); its default folder is `engines/<tag>-plugin`, so the two can be built side by side and compared.

manifest.json: {"schema": 1, "target" (the tag above, whatever the folder is called), "backend",
"model_preset", "model_type", "precision", "attention" ("onnx" | "plugin"),
"shape": {name, width, height, frame_num, latent [T, h, w]}, "checkpoint": {"dir", "fingerprint"},
"gpu", "engines": {graph: {"file", "onnx", "onnx_sha256", "inputs", "outputs" ([{name, shape, dtype}]),
"precision", "checkpoint_fingerprint", "builder", "gpu", "files" ({name: bytes}), "key", "seconds";
DiT engines also "attention"}}}.
The checkpoint fingerprint hashes config.json and each weight file's name, size and mtime (cheap; any
replaced or touched file counts as a new checkpoint). An engine is current when its entry's `key` (graph
contract, precision, checkpoint and code fingerprints, tool versions, builder options, GPU; for the DiT
also the attention option and, for plugins, the kernels' code) matches and its files have the recorded
sizes; current engines are skipped. Every file is written under a temporary name and renamed when
complete; the manifest is rewritten (atomically) after each engine, so a killed build keeps what it
finished and redoes the rest. Two builds into one folder serialise on `.lock`.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from flf2v.models import checkpoint as ck

from . import contracts as C

SCHEMA = 1
ROOT = Path(__file__).resolve().parents[1]
CODE_FILES = ("models/config.py", "models/checkpoint.py", "models/dit.py", "models/t5.py", "models/clip.py",
              "models/vae.py", "export/contracts.py", "export/onnx_export.py", "export/passes.py")
# baked into plugin engines: their DiT keys hash these too
KERNEL_FILES = ("export/plugins.py", "kernels/attention.py", "kernels/cross_attention.py", "kernels/trt_plugin.py")


class BuildError(RuntimeError):
    """A user mistake (bad checkpoint, preset, backend or precision): one line, exit code 2."""


# ---- targets ---------------------------------------------------------------------------------------

def trt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return gpu_info() is not None


def gpu_info() -> tuple[str, tuple[int, int]] | None:
    """(name, compute capability) of GPU 0, or None."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.splitlines()[0]
        name, cc = (s.strip() for s in out.split(","))
        major, minor = cc.split(".")
        return name, (int(major), int(minor))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def short_gpu_name(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA GeForce RTX 4090' -> 'rtx4090'."""
    words = [w for w in re.split(r"[\s\-_]+", name.lower()) if w not in ("nvidia", "geforce", "tesla", "")]
    if words and words[0] in ("rtx", "gtx", "quadro", "titan") and len(words) > 1:
        return words[0] + words[1]
    return words[0] if words else "gpu"


def target_tag(backend: str) -> str:
    """Engine folder name for this machine: `<gpu>-sm<cc>-trt<x.y>` or `cpu-ort<version>`."""
    if backend == "ort":
        import onnxruntime
        return f"cpu-ort{onnxruntime.__version__}"
    import tensorrt as trt
    info = gpu_info()
    if info is None:
        raise BuildError("TensorRT needs a CUDA GPU and none was found; use --backend ort")
    name, (major, minor) = info
    return f"{short_gpu_name(name)}-sm{major}{minor}-trt{'.'.join(trt.__version__.split('.')[:2])}"


def default_folder(backend: str, attention: str = "onnx") -> Path:
    return Path("engines") / (target_tag(backend) + ("-plugin" if attention == "plugin" else ""))


# ---- fingerprints, manifest ------------------------------------------------------------------------

def checkpoint_fingerprint(ckpt_dir) -> str:
    d = Path(ckpt_dir)
    h = hashlib.sha256((d / ck.DIT_CONFIG).read_bytes())
    for f in ck.weight_files(d):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


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
    import onnx
    import torch
    v = {"torch": torch.__version__, "onnx": onnx.__version__, "opset": 23}
    if backend == "ort":
        import onnxruntime
        v["onnxruntime"] = onnxruntime.__version__
    else:
        import polygraphy
        import tensorrt
        v["tensorrt"], v["polygraphy"] = tensorrt.__version__, polygraphy.__version__
    return v


def read_manifest(folder) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # a damaged manifest means nothing is known to be current


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_current(entry: dict | None, key: str, folder: Path) -> bool:
    if not entry or entry.get("key") != key:
        return False
    return all((folder / n).is_file() and (folder / n).stat().st_size == size for n, size in entry["files"].items())


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Exclusive use of `folder`; a second build waits for the first, then finds its engines current."""
    with open(folder / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
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


# ---- engines ---------------------------------------------------------------------------------------

def has_plugin_nodes(onnx_path: Path) -> bool:
    from .passes import load_structure
    from .plugins import DOMAIN
    return any(n.domain == DOMAIN for n in load_structure(onnx_path).graph.node)


def build_trt_engine(onnx_path: Path, engine_path: Path, graph: C.Graph, opt_level: int, cache: Path) -> None:
    """Strongly typed TensorRT engine with one static profile, via polygraphy; atomic."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path

    if has_plugin_nodes(onnx_path):  # the ONNX parser looks the flf2v plugins up while parsing
        from flf2v.kernels.trt_plugin import register_plugins
        register_plugins()
    # TensorRT 11 builds every network strongly typed and has no flag for it
    strongly = True if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") else None
    network = network_from_onnx_path(str(onnx_path), strongly_typed=strongly)
    profile = Profile()
    for s in graph.inputs:
        profile.add(s.name, s.shape, s.shape, s.shape)
    config = CreateConfig(profiles=[profile], builder_optimization_level=opt_level,
                          load_timing_cache=str(cache) if cache.exists() else None)
    engine = engine_bytes_from_network(network, config, save_timing_cache=str(cache))
    tmp = engine_path.with_name(f".{engine_path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(engine)
    os.replace(tmp, engine_path)


def build(ckpt_dir, shape: str | None = None, precision: str | None = None, out=None, backend: str = "auto",
          opt_level: int = 3, cfg_batch=(1, 2), only: list[str] | None = None, progress: bool = True,
          attention: str = "onnx") -> Path:
    """Build (or find current) every engine of one folder; returns the folder. `attention` ("onnx" or
    "plugin", TensorRT only) picks the DiT's attention: TensorRT's own, or the flf2v Triton plugins."""
    from tqdm.auto import tqdm

    from .onnx_export import export_graph
    from .plugins import ATTENTION

    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise BuildError(f"--ckpt_dir {ckpt_dir}: no such directory")
    try:
        preset = ck.preset_for(ckpt_dir)
        eshape = C.get_shape(preset, shape)
    except (ck.CheckpointError, ValueError) as e:
        raise BuildError(str(e)) from None
    if attention not in ATTENTION:
        raise BuildError(f"--attention {attention}: choose one of {', '.join(ATTENTION)}")
    if backend == "auto":
        backend = "trt" if trt_available() else "ort"
    elif backend == "trt" and not trt_available():
        raise BuildError("--backend trt needs the tensorrt package and a CUDA GPU; use --backend ort")
    if attention == "plugin" and backend != "trt":
        raise BuildError("--attention plugin needs TensorRT (--backend trt on a CUDA GPU): the plugin nodes "
                         "run the Triton kernels, which ONNX Runtime cannot; use --attention onnx")
    precision = precision or ("bf16" if backend == "trt" else "fp32")
    if backend == "ort" and precision != "fp32":
        raise BuildError(f"--precision {precision}: ONNX Runtime on the CPU runs fp32 graphs only; "
                         f"use --precision fp32 (bf16 engines need TensorRT)")
    all_graphs = C.graphs(preset, eshape, precision, cfg_batch=(1, 2))
    names = [g.name for g in all_graphs]
    for n in only or ():
        if n not in names:
            raise BuildError(f"--graphs: unknown graph {n!r}; choose from {', '.join(names)}")
    todo = [g for g in all_graphs if (not only or g.name in only)
            and (g.component != "dit" or int(g.name[-1]) in cfg_batch)]

    folder = Path(out) if out else default_folder(backend, attention)
    folder.mkdir(parents=True, exist_ok=True)
    info = gpu_info() if backend == "trt" else None
    gpu = {"name": info[0], "compute_capability": f"{info[1][0]}.{info[1][1]}"} if info else None
    versions = tool_versions(backend)
    fingerprint = checkpoint_fingerprint(ckpt_dir)
    code = code_fingerprint()
    kernels = code_fingerprint(KERNEL_FILES) if attention == "plugin" else None
    builder = {"backend": backend, **versions, **({"opt_level": opt_level} if backend == "trt" else {})}

    def attention_of(g: C.Graph) -> dict:
        """What the attention option adds to a graph's key and manifest entry (DiT graphs only)."""
        return {"attention": attention} if g.component == "dit" else {}

    def key_of(g: C.Graph) -> str:
        spec = {"graph": g.name, "inputs": [s.to_json() for s in g.inputs], "outputs": [s.to_json() for s in g.outputs],
                "precision": precision, "checkpoint": fingerprint, "code": code, "builder": builder, "gpu": gpu}
        if attention_of(g):  # a DiT engine of the other attention is never current
            spec.update(attention=attention, kernels=kernels)
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]

    with folder_lock(folder):
        _remove_leftovers(folder)
        old = read_manifest(folder).get("engines", {})
        manifest = {"schema": SCHEMA, "target": target_tag(backend), "backend": backend, "model_preset": preset.name,
                    "model_type": preset.dit.model_type, "precision": precision, "attention": attention,
                    "shape": eshape.to_json(preset),
                    "checkpoint": {"dir": str(ckpt_dir.resolve()), "fingerprint": fingerprint}, "gpu": gpu,
                    "engines": {g.name: old[g.name] for g in all_graphs
                                if is_current(old.get(g.name), key_of(g), folder)}}
        for name, entry in old.items():  # engines of another checkpoint, shape or precision: gone
            if name not in manifest["engines"]:
                for f in entry.get("files", {}):
                    (folder / f).unlink(missing_ok=True)
        write_atomic(folder / "manifest.json", json.dumps(manifest, indent=2).encode())

        bar = tqdm(todo, desc="engines", unit="graph", disable=not progress)
        for g in bar:
            if g.name in manifest["engines"]:
                continue
            bar.set_postfix_str(g.name)
            t0 = time.perf_counter()
            onnx_path = export_graph(g, ckpt_dir, folder / f"{g.name}.onnx", preset=preset,
                                     attention=attention_of(g).get("attention", "onnx"))
            files = [onnx_path] + [p for p in [onnx_path.with_name(onnx_path.name + ".data")] if p.exists()]
            onnx_sha = file_sha256(*files)
            engine = onnx_path
            if backend == "trt":
                engine = folder / f"{g.name}.engine"
                build_trt_engine(onnx_path, engine, g, opt_level, folder / "timing.cache")
                files.append(engine)
            manifest["engines"][g.name] = {
                "file": engine.name, "onnx": onnx_path.name, "onnx_sha256": onnx_sha,
                "inputs": [s.to_json() for s in g.inputs], "outputs": [s.to_json() for s in g.outputs],
                "precision": precision, "checkpoint_fingerprint": fingerprint, "builder": builder, "gpu": gpu,
                "files": {f.name: f.stat().st_size for f in files}, "key": key_of(g),
                "seconds": round(time.perf_counter() - t0, 1), **attention_of(g)}
            write_atomic(folder / "manifest.json", json.dumps(manifest, indent=2).encode())
    return folder


# ---- CLI -------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other user mistake
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    from .plugins import ATTENTION  # onnxscript: not at import, the runtime imports this module
    ap = _Parser(prog="flf2v-build", description="Export a Wan2.1 checkpoint to ONNX and build engines.")
    ap.add_argument("--ckpt_dir", required=True, help="official Wan2.1 checkpoint directory")
    ap.add_argument("--preset", default=None, help="engine shape preset, e.g. 720p, 480p, 720p-portrait "
                                                   "(default: the model's default size and frame count)")
    ap.add_argument("--precision", default=None, choices=C.PRECISIONS,
                    help="graph precision (default: bf16 for TensorRT, fp32 for ONNX Runtime)")
    ap.add_argument("--out", default=None, help="engine folder (default: engines/<target tag>)")
    ap.add_argument("--backend", default="auto", choices=("auto", "ort", "trt"))
    ap.add_argument("--opt_level", type=int, default=3, choices=range(6), metavar="{0..5}",
                    help="TensorRT builder optimization level")
    ap.add_argument("--cfg_batch", default="both", choices=("1", "2", "both"),
                    help="DiT engines to build: batch 1 (two forwards per step), batch 2 (CFG as one batch)")
    ap.add_argument("--graphs", default=None, help="comma-separated subset of the graphs to build")
    ap.add_argument("--attention", default="onnx", choices=ATTENTION,
                    help="DiT attention: TensorRT's own (onnx) or the fused Triton kernels as TensorRT "
                         "plugins (plugin, TensorRT only; default folder engines/<target tag>-plugin)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    cfg_batch = (1, 2) if args.cfg_batch == "both" else (int(args.cfg_batch),)
    only = [s for s in args.graphs.split(",") if s] if args.graphs else None
    try:
        folder = build(args.ckpt_dir, args.preset, args.precision, args.out, args.backend, args.opt_level,
                       cfg_batch, only, progress=not args.quiet, attention=args.attention)
    except BuildError as e:
        print(f"flf2v-build: error: {e}", file=sys.stderr)
        return 2
    except ck.CheckpointError as e:
        print(f"flf2v-build: error: {e}", file=sys.stderr)
        return 2
    n = len(read_manifest(folder).get("engines", {}))
    print(f"{folder}: {n} engines current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
