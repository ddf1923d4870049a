"""The backends a run can open by name: `torch` (runtime/torch_backend.py) and the engine folders' `ort`,
`trt` and `aoti`, each imported only when asked for."""
from __future__ import annotations

import torch

from flf2v.export import manifest as M
from flf2v.export.manifest import EngineError
from flf2v.models.config import Preset


def check_backend(kind: str, device) -> None:
    """EngineError (one line naming the fix) unless this machine can run `kind` engines on `device`."""
    if kind not in ("ort", "trt", "aoti"):
        raise EngineError(f"unknown backend {kind!r}; choose torch, ort, trt or aoti")
    if kind == "trt":
        if not torch.cuda.is_available() or torch.device(device).type != "cuda":
            raise EngineError("--backend trt needs a CUDA GPU; use --backend ort or torch here")
        try:
            import tensorrt  # noqa: F401
        except ImportError as e:
            raise EngineError(f"--backend trt needs TensorRT, which does not import here ({e}); "
                              f"{M.TRT_INSTALL}") from None


def open_backend(kind: str, folder, ckpt_dir, preset: Preset, device, **options):
    """`options`: backend keywords, e.g. io_binding=False for OrtBackend's NumPy path."""
    check_backend(kind, device)
    if kind == "aoti":
        from .aoti_backend import AotiBackend as cls
    elif kind == "ort":
        from .ort_backend import OrtBackend as cls
    else:
        from .trt_backend import TrtBackend as cls
    return cls(folder, ckpt_dir, preset, device, **options)
