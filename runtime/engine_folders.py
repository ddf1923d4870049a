"""Engine folders: which `flf2v-build` folder serves a run, and the backend that opens it.

The manifest (export/manifest.py) decides what a folder may serve: the same model preset, checkpoint, output
grids and (for TensorRT) GPU and TensorRT version; anything else is refused with the `make engines`
command that builds what would serve it. `find_engines` picks, among the folders of a root (one per
shape), the one that serves a run (runtime/backends.py opens it).
"""
from __future__ import annotations

from pathlib import Path

from flf2v.export import contracts as C
from flf2v.export import manifest as M
from flf2v.export.manifest import EngineError
from flf2v.models.config import Preset


def read_manifest(folder: Path, ckpt_dir, preset: Preset, kind: str, fingerprint: str | None = None) -> dict:
    """The folder's validated manifest (export/manifest.py), its ONNX external data checked too."""
    m = M.validate(folder, ckpt_dir, preset, kind, fingerprint)
    if kind == "ort":
        for e in m["engines"].values():
            check_external_data(folder / e["file"], folder, M.hint_for(m, ckpt_dir, folder, force=True))
    return m


def engine_video_shape(m: dict) -> tuple[int, int, int] | None:
    """(height, width, frames) a static folder serves; None for a dynamic one."""
    s = M.shape_of(m)
    return None if s.dynamic else (s.height, s.width, s.frame_num)


def find_engines(roots, ckpt_dir, preset: Preset, kind: str, serves, prefer=None,
                 why=None) -> tuple[Path | None, list[str], list[str]]:
    """The folder under `roots` whose engines are current for `ckpt_dir` on this machine and whose shape
    `serves(manifest) -> bool` accepts: the one `prefer(manifest)` ranks highest (a bool or a tuple of them:
    the run's LoRAs built in, ...), then a static one before a dynamic one (TensorRT may be faster at a fixed
    shape), then the first found; and why the others were passed over: folders that cannot serve this
    checkpoint here (each reason with its fix), and the others, each `folder + why(manifest)` (default: the
    shape it serves)."""
    fingerprint = M.checkpoint_fingerprint(ckpt_dir)  # read once for all candidates
    unusable, others, found = [], [], []
    for folder in (f for r in roots for f in M.folders_under(r)):
        try:
            m = read_manifest(folder, ckpt_dir, preset, kind, fingerprint)
        except EngineError as e:
            unusable.append(str(e))
            continue
        if serves(m):
            found.append((prefer(m) if prefer else True, not M.shape_of(m).dynamic, -len(found), folder))
        else:
            others.append(f"{folder} {why(m) if why else 'serves ' + M.describe(m)}")
    return (max(found)[-1] if found else None), unusable, others


def build_serving(preset: Preset, height: int, width: int, frame_num: int) -> str:
    """The shape (`flf2v-build --preset`) that serves a video: the first dynamic one holding it, else the
    static `<W>x<H>x<frames>`."""
    for name, shape in C.dynamic_shapes(preset).items():
        if shape.profile_of(preset, frame_num, height, width) is not None:
            return name
    return f"{width}x{height}x{frame_num}"


def check_external_data(onnx_path: Path, folder: Path, hint: str) -> None:
    """Refuse ONNX files that do not parse, or whose external weights point outside the engine folder."""
    import onnx
    from google.protobuf.message import DecodeError
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as e:  # a damaged file of the recorded size passes validate
        raise EngineError(f"{onnx_path}: damaged engine file ({type(e).__name__}: {e}); {hint}") from None
    root = folder.resolve()
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = {e.key: e.value for e in t.external_data}.get("location", "")
        target = (onnx_path.parent / loc).resolve()
        if Path(loc).is_absolute() or root not in target.parents:
            raise EngineError(f"{onnx_path}: external data of {t.name!r} points outside {folder} ({loc!r}); "
                              f"refusing to load it; {hint}")
