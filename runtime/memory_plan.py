"""The memory plan of a run: where each network's weights live per stage, chosen to fit the GPU.

Plans, fastest first (each also tried with the CFG pair as two batch-1 DiT calls, which halves the DiT's
activations for a few percent of speed):
- resident: the DiT on the device from load; T5 and CLIP released once used (as every CUDA run does).
- offload (`--offload_model`, official): the DiT on the device only for the denoising loop.
- t5_cpu (`--t5_cpu`, official): and T5 runs on the CPU, its 11.4 GB never on the GPU.
- blocks:N (`--offload blocks:N`): and only N DiT blocks stay on the device; the others stream from pinned
  host memory through two device slots, the next block's copy overlapped with the current one's compute
  (runtime/offload.py). At 720p a block computes ~10x longer than its 0.8 GB copy takes over PCIe Gen4.
  Engines built with STREAM=1 take the same plans: TensorRT's as the engine's weight-streaming budget
  (`dit_weight_budget`), aoti's as the blocks it keeps resident (export/aoti_stream.py); other engines
  load whole (only resident / offload plans fit them).
With each, the VAE decodes whole when it fits, else in the largest spatial tile that does (models/vae.py).
Bytes come from models/sizes.py (configs alone: no weights are read to plan). A run that no plan fits is
refused before anything loads, naming the smallest card it needs.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from flf2v.models import sizes
from flf2v.models.config import Preset

from .media import InputError

GiB = 2**30
RESERVE = 1 * GiB  # CUDA context, cuBLAS workspace and allocator slack, never planned into
PINNED_SHARE = 0.5  # of host RAM at most pinned for streamed blocks; the rest streams from pageable memory
TILES = (64, 48, 32, 24, 16)  # latent tile sizes tried for the VAE decode, largest first
TILE_OVERLAP = 8  # latent pixels (64 video pixels) blended between neighbouring tiles
STAGES = ("text_encoder", "image_encoder", "vae_encode", "denoise", "vae_decode")


@dataclass(frozen=True)
class Plan:
    offload_model: bool = False
    t5_cpu: bool = False
    blocks: int | None = None  # DiT blocks resident on the device when streamed; None: all of them
    cfg_batch: int = 2
    vae_tile: int | None = None  # latent tile of the VAE decode; None: whole frames
    stages: tuple[tuple[str, int], ...] = ()  # (stage, bytes on the device at its peak)
    host: int = 0  # bytes of weights kept in host memory for the device (offloaded or streamed)
    pinned: int = 0  # of those, pinned for streaming
    dit_budget: int | None = None  # bytes of DiT weights kept on the device when streamed (None: all)

    @property
    def name(self) -> str:
        parts = (["resident"] if not self.offload_model else ["offload"]) + (["t5_cpu"] if self.t5_cpu else [])
        parts += [f"blocks:{self.blocks}"] if self.blocks is not None else []
        parts += ["cfg_batch 1"] if self.cfg_batch == 1 else []
        parts += [f"vae tile {self.vae_tile}"] if self.vae_tile else []
        return " + ".join(parts)

    @property
    def peak(self) -> int:
        return max(b for _, b in self.stages)

    def describe(self) -> str:
        # 3 significant digits, as the --plan table: a small model's MB were a line of 0.0
        stages = ", ".join(f"{s} {b / GiB:.3g}" for s, b in self.stages)
        return (f"memory plan: {self.name}; device GiB at peak per stage: {stages}; host {self.host / GiB:.3g} GiB "
                f"({self.pinned / GiB:.3g} pinned)")

    def to_json(self) -> dict:
        return {"name": self.name, "offload_model": self.offload_model, "t5_cpu": self.t5_cpu,
                "blocks": self.blocks, "cfg_batch": self.cfg_batch, "vae_tile": self.vae_tile,
                "device_bytes": dict(self.stages), "host_bytes": self.host, "pinned_bytes": self.pinned,
                "dit_budget_bytes": self.dit_budget}


@dataclass(frozen=True)
class Video:
    """What a plan is made for: the model, the latent grid and batch, and the run's precision."""
    preset: Preset
    height: int
    width: int
    frames: int
    dtype_bytes: int = 2
    quant: str = "none"

    @property
    def latent(self) -> tuple[int, int, int]:
        v = self.preset.vae
        return (self.frames - 1) // v.stride[0] + 1, self.height // v.stride[1], self.width // v.stride[2]

    @property
    def tokens(self) -> int:
        t, h, w = self.latent
        p = self.preset.dit.patch_size
        return (t // p[0]) * (h // p[1]) * (w // p[2])


def stage_weights(video: Video, plan: Plan) -> dict[str, int]:
    """Bytes of weights on the device at each stage under `plan` (what the torch backend's `device_bytes`
    shows while the stage runs)."""
    w = sizes.weight_bytes(video.preset, video.dtype_bytes, video.quant)
    n = video.preset.dit.num_layers
    dit = w["dit_outer"] + w["dit_block"] * ((plan.blocks + 2) if plan.blocks is not None else n)  # 2 slots
    kept = 0 if plan.offload_model else dit  # on the device outside the loop too
    return {"text_encoder": kept + w["vae"] + (0 if plan.t5_cpu else w["t5"]),
            "image_encoder": kept + w["vae"] + w["clip"], "vae_encode": kept + w["vae"],
            "denoise": dit + w["vae"], "vae_decode": kept + w["vae"]}


def dit_weight_budget(video: Video, plan: Plan) -> int | None:
    """Bytes of DiT weights `plan` keeps on the device (outer layers and resident blocks): the budget a TensorRT
    weight-streaming engine gets (its streaming scratch stands where the torch backend's two slots are);
    None: the whole DiT."""
    if plan.blocks is None:
        return None
    w = sizes.weight_bytes(video.preset, video.dtype_bytes, video.quant)
    return w["dit_outer"] + plan.blocks * w["dit_block"]


def stage_bytes(video: Video, plan: Plan) -> dict[str, int]:
    """Bytes on the device at each stage's peak under `plan`: weights, and activations and caches."""
    _, h, w = video.latent
    d, v = video.dtype_bytes, video.preset.vae
    work = {"vae_encode": sizes.vae_encode_bytes(v, video.height, video.width, video.frames, d),
            "denoise": sizes.dit_activation_bytes(video.preset.dit, plan.cfg_batch, video.tokens, d),
            "vae_decode": sizes.vae_decode_bytes(v, h, w, video.frames, d, plan.vae_tile)}
    return {s: b + work.get(s, 0) for s, b in stage_weights(video, plan).items()}


def _host_bytes(video: Video, plan: Plan) -> tuple[int, int]:
    """(host bytes held for the device, of them pinned) under `plan`. Offloaded, the DiT's outer layers and
    resident blocks are on the host too outside the loop: with the streamed blocks, the whole DiT."""
    w = sizes.weight_bytes(video.preset, video.dtype_bytes, video.quant)
    n = video.preset.dit.num_layers
    streamed = (n - plan.blocks) * w["dit_block"] if plan.blocks is not None else 0
    rest = w["dit_outer"] + n * w["dit_block"] - streamed if plan.offload_model else 0
    return streamed + rest + (w["t5"] if plan.t5_cpu else 0), streamed


def candidates(video: Video, allowed=None):
    """Plans in the order of their speed, fastest first, without the VAE tile; `allowed(plan)`: the flags'
    filter. Streaming fewer blocks costs most, then T5 on the CPU, then the CFG pair as two calls, then moving
    the DiT in and out per run (a few seconds of copies)."""
    n = video.preset.dit.num_layers
    plans = [Plan(offload_model=o, t5_cpu=t, blocks=b, cfg_batch=c) for o in (False, True) for t in (False, True)
             for b in (None, *range(n - 1, -1, -1)) for c in (2, 1)]
    plans.sort(key=lambda p: (p.blocks is not None, -(p.blocks or 0), p.t5_cpu, p.cfg_batch == 1, p.offload_model))
    return [p for p in plans if allowed is None or allowed(p)]


def finish(video: Video, plan: Plan, budget: int | None) -> Plan:
    """`plan` with its VAE tile (none if whole frames fit `budget`, else the largest that fits) and bytes."""
    _, h, w = video.latent
    for tile in (None, *(t for t in TILES if t < max(h, w))):
        p = dataclasses.replace(plan, vae_tile=tile)
        stages = stage_bytes(video, p)
        if budget is None or stages["vae_decode"] <= budget or tile == TILES[-1]:
            break
    host, pinned = _host_bytes(video, p)
    return dataclasses.replace(p, stages=tuple(stages.items()), host=host, pinned=pinned,
                               dit_budget=dit_weight_budget(video, p))


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose(video: Video, gpu_bytes: int, allowed=None, host_bytes: int | None = None, what: str = "") -> Plan:
    """The fastest plan whose every stage fits `gpu_bytes` (minus RESERVE) and whose host share fits host RAM,
    among those `allowed` (the flags' filter, said as `what`). InputError naming the smallest card otherwise."""
    budget, host_bytes = gpu_bytes - RESERVE, host_bytes or host_memory()
    fp8 = "" if video.quant == "fp8" else ", or add --quant fp8"  # what is left to halve the DiT's weights
    plans = candidates(video, allowed)
    if not plans:  # min() of nothing was a traceback
        raise InputError(f"no memory plan is left{what}: the flags exclude each other; drop one")
    fit = [p for p in (finish(video, p, budget) for p in plans) if p.peak <= budget]
    for tiled in (False, True):  # a tiled decode (seams) only when no plan fits decoding whole frames
        for p in fit:
            if (tiled or p.vae_tile is None) and p.host <= 0.9 * host_bytes:
                return p
    if fit:
        least = min(fit, key=lambda p: p.host)
        raise InputError(f"no memory plan{what} fits {gpu_bytes / GiB:.3g} GiB with this host's RAM: the one that "
                         f"needs least ({least.name}) keeps {least.host / GiB:.1f} GiB of weights in host memory, over "
                         f"90% of {host_bytes / GiB:.1f} GiB; add RAM{fp8}")
    if gpu_bytes <= RESERVE:  # no plan helps: the reserve alone fills the card
        raise InputError(f"{gpu_bytes / GiB:.3g} GiB is no more than the {RESERVE / GiB:.0f} GiB reserved for CUDA's "
                         f"context and allocator; give the card's size (--gpu_memory GiB)")
    need = min((finish(video, p, 0) for p in plans), key=lambda p: p.peak)
    card = math.ceil((need.peak + RESERVE) / GiB * 10) / 10  # rounded up: a card of that size fits
    raise InputError(f"no memory plan{what} fits {gpu_bytes / GiB:.3g} GiB at {video.width}x{video.height}, "
                     f"{video.frames} frames ({video.preset.name}): it needs a {card:.1f} GiB card ({need.name}); "
                     f"lower --size or --frame_num{fp8}")


def table(video: Video, gpu_bytes: int, host_bytes: int | None = None, allowed=None,
          what: str = "") -> tuple[str, str | None]:
    """`flf2v-run --plan`: (every plan level with its bytes per stage, the one `choose` takes marked among those
    `allowed` or why none fits; that plan's name, None where none fits)."""
    budget = gpu_bytes - RESERVE
    try:
        chosen, why = choose(video, gpu_bytes, allowed, host_bytes, what).name, ""
    except InputError as e:
        chosen, why = None, str(e)
    lines = [f"memory plans for {video.preset.name} at {video.width}x{video.height}, {video.frames} frames, "
             f"{'fp8' if video.quant == 'fp8' else f'{8 * video.dtype_bytes}-bit'} weights, on "
             f"{gpu_bytes / GiB:.3g} GiB ({RESERVE / GiB:.0f} GiB reserved); device GiB per stage:",
             "  " + "  ".join(f"{s[:12]:>12}" for s in STAGES) + "  host GiB  plan"]
    shown = [p for p in candidates(video) if p.blocks is None or (p.offload_model and p.t5_cpu and p.blocks == 0)
             or finish(video, p, budget).name == chosen]
    for p in (finish(video, p, budget) for p in shown):
        b = dict(p.stages)
        mark = "*" if p.name == chosen else " "
        # 3 significant digits: a small model's MB show, not rows of 0.0
        lines.append(f"{mark} " + "  ".join(f"{b[s] / GiB:12.3g}" for s in STAGES) + f"  {p.host / GiB:8.3g}  {p.name}")
    lines.append(f"* chosen: {chosen}" if chosen else why)
    lines.append("(blocks:N streams all but N DiT blocks; of the streamed plans only the chosen one and the "
                 "smallest are shown)")
    return "\n".join(lines), chosen
