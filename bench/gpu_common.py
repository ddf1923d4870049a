"""What the parts of `make gpu-check` share. A part is `part(run, data, part_end)`: it fills `data` (recorded
as it goes) and raises Skip or CheckFailed. Box-safe at import: stdlib only (torch and flf2v inside)."""
from __future__ import annotations

import gc
import importlib.util
import statistics
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout (also when imported through a symlink `flf2v`)


class PartTimeout(BaseException):
    """Raised by SIGALRM when a part runs past its limit (BaseException: no `except Exception` swallows it)."""


class Skip(Exception):
    """A part (or the rest of it) cannot run here; the message is the one-line reason."""


class CheckFailed(Exception):
    """A part ran but a result is outside its tolerance."""


def log(msg: str) -> None:
    print(f"gpu-check: {msg}", flush=True)


def one_line(err: BaseException | str, limit: int = 400) -> str:
    s = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def check(problems: list) -> None:
    if problems := [p for p in problems if p]:
        raise CheckFailed("; ".join(problems))


def absent(modules) -> list[str]:
    """The modules of `modules` that this python cannot import."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def short_of(run, part_end: float, need: float) -> str | None:
    """Why a step that needs `need` seconds is skipped, None when it fits (always in the smoke test)."""
    left = part_end - time.monotonic()
    return None if run.smoke or left >= need else f"time budget: {left:.0f} s left of the part, ~{need:.0f} s needed"


def guarded(fn, row: dict, *args, trace: bool = False) -> dict:
    """fn(row, *args) fills one row of a part; when it raises, the row keeps what it measured and says the
    error (one row fails, the others stay). Returns the row."""
    try:
        fn(row, *args)
    except Exception as e:  # noqa: BLE001
        row["error"] = one_line(e)
        if trace:
            row["traceback"] = traceback.format_exc(limit=6)[-2000:]
    return row


def sync(run) -> None:
    if run.cuda:
        import torch
        torch.cuda.synchronize()


def timed_s(run, fn, reps: int) -> tuple[float, list[float]]:
    """Median wall seconds of fn() over reps runs, synchronised on CUDA; and every run's."""
    times = []
    for _ in range(max(1, reps)):
        sync(run)
        t0 = time.perf_counter()
        fn()
        sync(run)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def timed_call(run, row: dict, key: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) once, its wall seconds (synchronised on CUDA) recorded as row[key]; its result."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(run)
    row[key] = time.perf_counter() - t0
    return out


def free_cuda(run) -> None:
    gc.collect()
    if run.cuda:
        import torch
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def errors(a, b) -> dict:
    from flf2v.bench.kernels import errors as err  # max_abs, max_rel of a against b
    return err(a, b)


def cosine(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / max((a.norm() * b.norm()).item(), 1e-300))


def dtype_of(run):
    """What the parts measure in: bf16 on the GPU, fp32 in the smoke test; (dtype, its name)."""
    import torch
    dtype = torch.float32 if run.smoke else torch.bfloat16
    return dtype, str(dtype).removeprefix("torch.")


def model_preset(run):
    from flf2v.models.config import get_preset
    return get_preset("tiny" if run.smoke else "flf2v-14B")


def video_shapes(run) -> list[str]:
    """Engine shape presets whose token counts the parts measure at (the first: the DiT slice's, 8-bit's...)."""
    return ["tiny", "tiny-wide"] if run.smoke else ["720p", "480p"]


def tokens_of(preset, shape_name: str) -> tuple[int, tuple[int, int, int], object]:
    from flf2v.bench.cost import dit_tokens
    from flf2v.export.contracts import get_shape
    shape = get_shape(preset, shape_name)
    latent = shape.latent(preset)
    return dit_tokens(preset.dit, latent), latent, shape


def torch_denoiser(dit, dtype, device):
    """The torch backend's `denoise` on an in-memory DiT (TorchBackend loads from a checkpoint directory, which
    needs the tokenizer's ftfy; its denoise only reads the DiT and the dtype)."""
    import torch

    from flf2v.runtime.torch_backend import TorchBackend
    backend = TorchBackend.__new__(TorchBackend)
    backend.dit, backend.dtype, backend.device = dit, dtype, torch.device(device)
    return backend.denoise


def loop_inputs(cfg, latent, device, seed: int = 1):
    """(x, context, clip, y) of the denoising loop, context with the negative prompt's row."""
    import torch
    g = torch.Generator().manual_seed(seed)
    shapes = ((1, cfg.out_dim, *latent), (2, cfg.text_len, cfg.text_dim), (1, cfg.clip_tokens, cfg.clip_dim),
              (1, cfg.in_dim - cfg.out_dim, *latent))
    return tuple(torch.randn(*s, generator=g).to(device) for s in shapes)


def build_random_dit(cfg, dtype, device, attention: str = "sdpa"):
    """WanDiT(cfg) with random weights made on `device` (no host copy: built on meta, filled on the device)."""
    import torch

    from flf2v.models.dit import WanDiT
    from flf2v.models.make_tiny import randomize_
    with torch.device("meta"):
        model = WanDiT(cfg, attention=attention)
    model = model.to(dtype).to_empty(device=device)  # the fixed tables are real and stay fp32 (WanDiT._apply)
    with torch.device(device):
        randomize_(model, torch.Generator(device=device).manual_seed(0))
    return model.eval().requires_grad_(False)


def slice_inputs(run, cfg, latent):
    """The DiT slice's inputs (x, t, context, clip, y), batch 1."""
    import torch
    x, context, clip, y = loop_inputs(cfg, latent, run.device, seed=2)
    return x[:1], torch.tensor([999], device=run.device), context[:1], clip, y[:1]
