"""The engine folder and its `manifest.json`: one module for the build (which writes it) and the runtime
(which reads and validates it). The runtime imports this module, never the build command.

Folders: `engines/<target>[-plugin|-sage]/<key>/<shape>/`, where the target tag names the machine the engines run
on (`h100-sm90-trt11.4`, `cpu-ort1.32.0`), the build key what they were built from (`flf2v-14B-bf16-3f9a2c1b`:
model, precision, checkpoint fingerprint, and the LoRA set's when LoRAs are merged), and `<shape>` the grids
they serve (`dynamic`: every official size and aspect ratio; a static `720p`, `480p-portrait`, ...), so
checkpoints never share a folder, several shapes live side by side, and a run picks the folder of its
checkpoint that serves its grid (a static one first: TensorRT may be faster at a fixed shape).

manifest.json: {"schema", "target", "backend", "model_preset", "model_type", "precision", "attention"
("onnx" | "plugin" | "sage"), "quant" ("none" | "fp8"), "shape": static {name, "dynamic": false, width, height,
frame_num, latent [T, h, w]}
or dynamic {name, "dynamic": true, sizes, frames [min, max], max_aspect, profiles [{min, opt, max}: root
dims [T, hp, wp] (contracts.DIMS)]},
"checkpoint": {"dir", "fingerprint", "layout", "dtypes"}, "gpu", "engines": {graph: {"file", "onnx", "onnx_sha256", "inputs",
"outputs" ([{name, shape, dtype}]; a dynamic dim is a string "k*T" | "k*hp" | "k*wp"), "precision",
"checkpoint_fingerprint", "builder", "gpu", "files" ({name: bytes}), "key", "seconds", "profiles" (dynamic
graphs: the optimization profiles built); DiT engines also "attention"}}}.

The checkpoint fingerprint is of content, not of file times or layout (models/fingerprint.py): every
tensor's official key, shape and sampled values, so a `cp -r`, a `touch` or the same weights in the
diffusers or ComfyUI layout keep their engines (weights that differ anywhere differ at the samples:
fine-tunes change every tensor). It reads two rows a tensor: cheap on a 65 GB checkpoint, where a full hash
would take minutes.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

from flf2v.models.config import Preset

SCHEMA = 4  # 2: content fingerprints, a folder per shape; 3: dynamic shapes; 4: fingerprints of tensors, any layout
MANIFEST = "manifest.json"
ENGINES_ROOT = Path("engines")
# What fixes a missing TensorRT (pyproject's gpu-cu13 / gpu-cu12 extras; README "GPU quick start").
TRT_INSTALL = ("install it with `make setup` (driver R580+: CUDA 13; R525+: GPU=cu12) or "
               "`pip install tensorrt-cu13==11.4.0.106 polygraphy` (tensorrt-cu12 for CUDA 12 drivers)")
COMPONENT_GRAPHS = ("t5", "clip", "vae_encode_first", "vae_encode_chunk", "vae_decode_first", "vae_decode_chunk")


class EngineError(ValueError):
    """An engine folder that cannot serve this run; the message names the command that fixes it."""


# ---- the machine -----------------------------------------------------------------------------------

def trt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return gpu_info() is not None


def ort_cuda_available() -> bool:
    """onnxruntime-gpu with its CUDA execution provider and a GPU: bf16 ONNX Runtime engines can run."""
    import onnxruntime
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers() and gpu_info() is not None


@functools.cache  # one answer per process: the nvidia-smi fallback may take seconds
def gpu_info() -> tuple[str, tuple[int, int]] | None:
    """(name, compute capability) of GPU 0, or None."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
    try:  # a CPU-only torch on a GPU machine: ask the driver
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
    """This machine's engine target: `<gpu>-sm<cc>-trt<x.y>`, `cpu-ort<version>`, or for AOTInductor
    packages (compiled code for one architecture and torch version) `<gpu>-sm<cc>-aoti-torch<x.y>` /
    `cpu-aoti-torch<x.y>`."""
    if backend == "ort":
        import onnxruntime
        return f"cpu-ort{onnxruntime.__version__}"
    if backend == "aoti":
        import torch
        version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
        if not torch.cuda.is_available():
            return f"cpu-aoti-torch{version}"
        name, (major, minor) = torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
        return f"{short_gpu_name(name)}-sm{major}{minor}-aoti-torch{version}"
    import tensorrt as trt
    info = gpu_info()
    if info is None:
        raise EngineError("TensorRT needs a CUDA GPU and none was found; use --backend ort")
    name, (major, minor) = info
    return f"{short_gpu_name(name)}-sm{major}{minor}-trt{'.'.join(trt.__version__.split('.')[:2])}"


def target_root(backend: str, attention: str = "onnx") -> Path:
    """`engines/<target>[-<attention>]`: the engines built for this machine, one folder per build key."""
    return ENGINES_ROOT / (target_tag(backend) + ("" if attention == "onnx" else f"-{attention}"))


def build_key(preset_name: str, precision: str, fingerprint: str, loras: list[dict]) -> str:
    """`<model>-<precision>-<checkpoint>[-lora<set>]`: what a default folder holds, so that two checkpoints,
    precisions or LoRA sets never share one (a build replaces its folder's engines; at 14B, hours of work)."""
    key = f"{preset_name}-{precision}-{fingerprint[:8]}"
    if loras:
        key += f"-lora{hashlib.sha256(json.dumps(lora_ids(loras)).encode()).hexdigest()[:8]}"
    return key


def default_folder(backend: str, shape: str, attention: str = "onnx", key: str = "") -> Path:
    """`engines/<target>[-<attention>]/<build key>/<shape>`."""
    return target_root(backend, attention) / key / shape


# ---- fingerprints ----------------------------------------------------------------------------------

def checkpoint_fingerprint(ckpt_dir) -> str:
    """Of the weights under their official keys, whatever the layout (models/fingerprint.py)."""
    from flf2v.models.fingerprint import content_fingerprint
    return content_fingerprint(ckpt_dir)


# ---- reading and writing ---------------------------------------------------------------------------

def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write(folder: Path, manifest: dict) -> None:
    write_atomic(Path(folder) / MANIFEST, json.dumps(manifest, indent=2).encode())


def load(folder) -> dict:
    """The manifest as written; {} when the folder has none or it is damaged (nothing known current)."""
    try:
        m = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return m if isinstance(m, dict) else {}


def rebuild_hint(ckpt_dir, folder=None, shape: str | None = None, precision: str | None = None,
                 attention: str | None = None, loras=(), backend: str | None = None,
                 cfg_batch: str | None = None, quant: str | None = None, force: bool = False) -> str:
    """The `flf2v-build` command that builds `folder` (or the default one, under ./engines, where runs look)
    as this run needs it: it works from wherever the run was started, a pip install included (`make engines`
    needs the checkout's Makefile). `loras`: "PATH:SCALE" entries; `backend` always named when known (the
    build's auto would pick TensorRT on a GPU where an ORT folder was meant); `cfg_batch` the DiT layouts
    ("both" for --cfg_parallel); `force` rebuilds engines that look current (a damaged file of the right size)."""
    flags = [("--ckpt_dir", ckpt_dir), ("--preset", shape), ("--precision", precision), ("--out", folder),
             ("--cfg_batch", cfg_batch), ("--backend", backend),
             ("--attention", attention if attention != "onnx" else None),
             ("--quant", quant if quant != "none" else None)] + [("--lora", e) for e in loras]
    words = [w for flag, v in flags if v for w in (flag, shlex.quote(str(v)))] + (["--force"] if force else [])
    return f"run `flf2v-build {' '.join(words)}`"


def hint_for(m: dict, ckpt_dir, folder, **kw) -> str:
    """rebuild_hint for the build manifest `m` records, into `folder` (None: the default one); `kw` overrides."""
    built = dict(shape=m["shape"]["name"], precision=m.get("precision"), attention=m.get("attention"),
                 backend=m.get("backend"), quant=m.get("quant"))
    return rebuild_hint(ckpt_dir, folder, **(built | kw))


def validate(folder, ckpt_dir, preset: Preset, kind: str, fingerprint: str | None = None) -> dict:
    """The manifest of `folder` if its engines can serve `ckpt_dir` on this machine, else EngineError
    with the command that rebuilds the folder as given."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise EngineError(f"{folder}: no engines here ({MANIFEST} missing); "
                          f"{rebuild_hint(ckpt_dir, folder)}")
    m = load(folder)
    try:
        engines, hint = m["engines"], hint_for(m, ckpt_dir, folder)  # hint_for reads m["shape"]
        _check_types(m)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # load() gives {} for what is not a JSON object
        why = repr(e) if m else "not a JSON object: damaged"
        raise EngineError(f"{path}: unreadable manifest ({why}); {rebuild_hint(ckpt_dir, folder)}") from None
    if m.get("schema") != SCHEMA:
        raise EngineError(f"{folder} was built by an older flf2v (manifest schema {m.get('schema')}, "
                          f"need {SCHEMA}); {hint}")
    # another backend's, model's or checkpoint's engines stay: the fix builds a folder of its own beside them
    found = " (runs without --engines find it)"
    if m.get("backend") != kind:
        other = hint_for(m, ckpt_dir, None, backend=kind)
        raise EngineError(f"{folder} holds {m.get('backend')} engines, not {kind}; pass --backend "
                          f"{m.get('backend')}, or for {kind} engines {other}{found}")
    own = hint_for(m, ckpt_dir, None) + found
    if m.get("model_preset") != preset.name:
        raise EngineError(f"{folder} was built for {m.get('model_preset')}, the checkpoint is {preset.name}; {own}")
    if m.get("checkpoint", {}).get("fingerprint") != (fingerprint or checkpoint_fingerprint(ckpt_dir)):
        raise EngineError(f"{folder} was built from another checkpoint ({m.get('checkpoint', {}).get('dir')}); {own}")
    if kind in ("trt", "aoti") and m.get("target") != target_tag(kind):
        raise EngineError(f"{folder} was built for {m.get('target')}, this machine is {target_tag(kind)}; {hint}")
    if building(folder):  # its files come and go: "run flf2v-build ..." would only wait for it
        hint = "a flf2v-build into this folder is running now: run again once it has ended"
    for name, e in engines.items():
        for f, size in e.get("files", {}).items():
            p = folder / f
            if not p.is_file() or p.stat().st_size != size:
                raise EngineError(f"{p}: missing or damaged engine file ({name}); {hint}")
    missing = [g for g in COMPONENT_GRAPHS if g not in engines] + ([] if any(g.startswith("dit_b") for g in engines)
                                                                  else ["the DiT"])
    if missing:
        raise EngineError(f"{folder}: incomplete build (missing {', '.join(missing)}); {hint}")
    return m


def building(folder: Path) -> bool:
    """Whether a flf2v-build holds the folder's lock (export/build.py folder_lock) now."""
    try:
        with open(folder / ".lock") as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no lock file: no build ever ran here, or a copy without it
        return False
    return False


def shape_of(m: dict):
    """The manifest's shape as a contracts.EngineShape (static) or DynamicShape."""
    from .contracts import DynamicShape, EngineShape, Profile
    s = m["shape"]
    if not s.get("dynamic"):
        return EngineShape(str(s["name"]), int(s["width"]), int(s["height"]), int(s["frame_num"]))
    profiles = tuple(Profile(*(tuple(int(v) for v in p[k]) for k in ("min", "opt", "max"))) for p in s["profiles"])
    if not profiles or any(len(d) != 3 for p in profiles for d in (p.min, p.opt, p.max)):
        raise ValueError("a dynamic shape needs profiles of three root dims")
    lo, hi = (int(v) for v in s["frames"])
    return DynamicShape(str(s["name"]), tuple(str(v) for v in s["sizes"]), (lo, hi), float(s["max_aspect"]),
                        profiles)


def serves(m: dict, preset: Preset, height: int, width: int, frame_num: int) -> bool:
    """Whether the folder of manifest `m` can make a video of this shape."""
    shape = shape_of(m)
    if shape.dynamic:
        return shape.profile_of(preset, frame_num, height, width) is not None
    return (shape.height, shape.width, shape.frame_num) == (height, width, frame_num)


def describe(m: dict) -> str:
    """'1280x720, 81 frames' or 'dynamic: 5-81 frames, W x H 624-1584 x 400-1024 or 400-1024 x 624-1584, ...'."""
    from flf2v.models.config import get_preset
    shape = shape_of(m)
    if not shape.dynamic:
        return f"{shape.width}x{shape.height}, {shape.frame_num} frames"
    p = get_preset(m["model_preset"])
    sp = p.vae.stride[1] * p.dit.patch_size[1]
    boxes = " or ".join(f"{sp * q.min[2]}-{sp * q.max[2]} x {sp * q.min[1]}-{sp * q.max[1]}" for q in shape.profiles)
    return (f"{shape.name}: {shape.frames[0]}-{shape.frames[1]} frames, W x H {boxes} (sizes "
            f"{', '.join(shape.sizes)}, first frames 1:{shape.max_aspect:g} to {shape.max_aspect:g}:1)")


def _check_types(m: dict) -> None:
    """What the runtime reads from a manifest has the types it expects, and every file it names lies in
    the folder (a damaged or hostile manifest is refused, never followed)."""
    if not isinstance(m.get("checkpoint"), dict) or not isinstance(m["engines"], dict):
        raise TypeError("checkpoint and engines must be objects")
    shape_of(m)
    for name, e in m["engines"].items():
        names = [e["file"], *e["files"]]
        if not isinstance(e["files"], dict) or not all(isinstance(f, str) for f in names):
            raise TypeError(f"{name}: file names must be strings")
        bad = [f for f in names if Path(f).name != f or f in ("", ".", "..")]
        if bad:
            raise ValueError(f"{name}: file {bad[0]!r} is not a plain name inside the folder")


def folders_under(root) -> list[Path]:
    """Engine folders at `root` or up to three levels below it (engines/ holds a folder per target, each a
    folder per build key, each a folder per shape)."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted({p.parent for depth in (1, 2, 3) for p in root.glob("*/" * depth + MANIFEST)})


def lora_ids(entries) -> list[tuple[str, float]]:
    """A LoRA set as (fingerprint, scale) pairs, the identity builds and runs compare."""
    return [(e.get("fingerprint"), float(e.get("scale", 1.0))) for e in entries or []]


def holds_other(m: dict, new: dict) -> str | None:
    """What the engines of a folder's manifest `m` were built as that a build writing manifest `new` would
    replace: another backend, model, checkpoint, precision, attention, quant, weight streaming, shape or LoRA
    set (None: the same build, or no engines)."""
    if not m.get("engines"):
        return None
    fields = (("backend", lambda x: x.get("backend")), ("model", lambda x: x.get("model_preset")),
              ("checkpoint", lambda x: (x.get("checkpoint") or {}).get("fingerprint")),
              ("precision", lambda x: x.get("precision")), ("attention", lambda x: x.get("attention")),
              ("quant", lambda x: x.get("quant", "none")),
              ("weight streaming", lambda x: x.get("weight_streaming", False)),
              ("shape", lambda x: (x.get("shape") or {}).get("name")), ("LoRAs", lambda x: lora_ids(x.get("loras"))))
    differs = [f"{name} {m.get('checkpoint', {}).get('dir') if name == 'checkpoint' else get(m)}"
               for name, get in fields if get(m) != get(new)]
    return ", ".join(differs) or None
