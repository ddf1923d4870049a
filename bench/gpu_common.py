"""What the parts of `make gpu-check` (bench/gpu_check.py) share: the outcomes a part raises (Skip,
CheckFailed, PartTimeout), logging, timing on the device, error measures, and the model preset, video shapes
and random inputs the parts measure at. Box-safe at import: stdlib only; torch and flf2v modules are imported
inside the functions that use them."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flf2v.bench.gpu_check import Run

ROOT = Path(__file__).resolve().parents[1]  # the checkout (also when imported through a symlink `flf2v`)


class PartTimeout(BaseException):
    """Raised by SIGALRM when a part runs past its limit (BaseException: no `except Exception` swallows it)."""


class Skip(Exception):
    """A part (or the rest of it) cannot run here; the message is the one-line reason."""


class CheckFailed(Exception):
    """A part ran but a result is outside its tolerance."""


# ---- helpers for the parts ----------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"gpu-check: {msg}", flush=True)


def one_line(err: BaseException | str, limit: int = 400) -> str:
    s = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def sync(run: Run) -> None:
    if run.cuda:
        import torch
        torch.cuda.synchronize()


def timed_s(run: Run, fn, reps: int) -> tuple[float, list[float]]:
    """Median wall seconds of fn() over reps runs, synchronised on CUDA."""
    times = []
    for _ in range(max(1, reps)):
        sync(run)
        t0 = time.perf_counter()
        fn()
        sync(run)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def errors(a, b) -> dict:
    from flf2v.bench.kernels import errors as err
    return err(a, b)


def cosine(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / max((a.norm() * b.norm()).item(), 1e-300))


def model_preset(run: Run):
    from flf2v.models.config import get_preset
    return get_preset("tiny" if run.smoke else "flf2v-14B")


def video_shapes(run: Run) -> list[str]:
    """Engine shape presets whose token counts the kernels and the DiT slice are measured at."""
    return ["tiny", "tiny-wide"] if run.smoke else ["720p", "480p"]


def tokens_of(preset, shape_name: str) -> tuple[int, tuple[int, int, int], object]:
    from flf2v.bench.cost import dit_tokens
    from flf2v.export.contracts import get_shape
    shape = get_shape(preset, shape_name)
    latent = shape.latent(preset)
    return dit_tokens(preset.dit, latent), latent, shape


def free_cuda(run: Run) -> None:
    import gc
    gc.collect()
    if run.cuda:
        import torch
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def torch_denoiser(dit, dtype, device):
    """The torch backend's `denoise` on an in-memory DiT (TorchBackend loads from a checkpoint directory,
    which needs the tokenizer's ftfy; its denoise only reads the DiT and the dtype)."""
    import torch

    from flf2v.runtime.torch_backend import TorchBackend
    backend = TorchBackend.__new__(TorchBackend)
    backend.dit, backend.dtype, backend.device = dit, dtype, torch.device(device)
    return backend.denoise


def loop_inputs(cfg, latent, device, seed: int = 1):
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.out_dim, *latent, generator=g)
    context = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)
    clip = torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=g)
    y = torch.randn(1, cfg.in_dim - cfg.out_dim, *latent, generator=g)
    return tuple(t.to(device) for t in (x, context, clip, y))
