"""One I/O contract per exported graph: it drives export, engine builds, runtime buffers and tests.

Graphs of one engine folder (one model preset, one output grid, one precision):

| graph | inputs | outputs |
|---|---|---|
| `t5` | ids, mask int64 [2, text_len] (prompt, negative prompt) | context f32 [2, text_len, text_dim] |
| `clip` | pixels f32 [n, 3, 224, 224] (n = 2 FLF2V, 1 I2V) | clip_fea f32 [n, 257, clip_dim] |
| `dit_b1`, `dit_b2` | x f32 [B,16,T,h,w], t int64 [B], context f32 [B,text_len,text_dim], clip_fea f32 [B, clip_tokens, clip_dim], y f32 [B,20,T,h,w] | v f32 [B,16,T,h,w], hidden f32 [B,T,h/2,w/2,dim] |
| `dit_cached_b1`, `_b2` | x, x_prev f32 [B,16,T,h,w], t int64 [B], y f32 [B,20,T,h,w], hidden f32 [B,T,h/2,w/2,dim] | v f32 [B,16,T,h,w] |
| `vae_encode_first` / `_chunk` | x f32 [1,3,1 or 4,H,W] in [-1,1], cache_in.{i} | z f32 [1,16,1,h,w], cache_out.{i} |
| `vae_decode_first` / `_chunk` | z f32 [1,16,1,h,w], cache_in.{i} | frames f32 [1,3,1 or 4,H,W], cache_out.{i} |

DiT step cache (runtime/cache.py): `dit_b*` also return `hidden`, the blocks' output, and `dit_cached_b*`
(patch embedding, time embedding and head only: a few MB of weights) reuse it on a skipped step,
adding the blocks' residual at the last computed step, hidden - tokens(x_prev), to this step's tokens.
The residual travels as (hidden, x_prev), not as hidden - tokens: the engine need not keep the blocks'
input alive through all the blocks (1.5 GB per batch row at 720p).

Dtype rule. fp32 graphs are fp32 throughout. bf16 graphs hold bf16 weights and activations with the
fp32 islands of the reference networks (norms, RoPE, modulation, time embedding, DiT residual stream and
head); every tensor the runtime keeps between graphs is fp32 in both precisions (text and image features,
latents x / y / v / z, video frames), so one runtime buffer layout serves both, and the few casts at the
graph edges cost nothing next to the graph. The exception is the VAE feature caches: they are the VAE's
activations, large at 720p (2.2 G elements for the decoder), and pass only from one chunk step to the
next, so they stay in the compute dtype (bf16 in bf16 graphs).

VAE chunk steps: the runtime owns the loop. Encode = `vae_encode_first` on frame 0, then
`vae_encode_chunk` on each 4 frames; decode = `vae_decode_first` on latent frame 0, then
`vae_decode_chunk` on each further latent frame. Every step takes `cache_in.{i}` and returns
`cache_out.{i}` (same shapes, fed back as the next step's `cache_in.{i}`); the first steps take zeros
(the official code starts with no cache, which equals a zero cache) and ignore some of them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from flf2v.models.clip import run_dtype as clip_run_dtype
from flf2v.models.config import Preset, latent_grid

OPSET = 23  # ONNX Attention and RMSNormalization (TensorRT parses both from 10.15)
PRECISIONS = ("fp32", "bf16")
COMPUTE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.int64: "int64"}
TORCH_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
VAE_GRAPHS = ("vae_encode_first", "vae_encode_chunk", "vae_decode_first", "vae_decode_chunk")
WEIGHT_PREFIX = "net."  # adapters hold the network as `net`: ONNX initializer = "net." + checkpoint key


DIMS = ("T", "hp", "wp")  # root dims of dynamic graphs: latent frames, latent height / patch, width / patch


def dim_value(d: int | str, dims: dict[str, int]) -> int:
    """A spec dim at the given root dims: an int as is, "k*name" or "name" (name in DIMS) evaluated."""
    if isinstance(d, int):
        return d
    k, _, name = d.rpartition("*")
    return (int(k) if k else 1) * dims[name]


def _dim(d) -> int | str:
    """An int, or a sympy expression `k*name` of one root dim (graphs() computes shapes on symbols)."""
    if isinstance(d, int) or getattr(d, "is_Integer", False):
        return int(d)
    text = str(d)
    k, _, name = text.rpartition("*")
    if name not in DIMS or (k and not k.isdigit()):
        raise ValueError(f"dynamic dim {text!r} is not of the form k*{'|'.join(DIMS)}")
    return text


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # str: a dynamic dim "k*T" | "k*hp" | "k*wp" (see DIMS)
    dtype: str  # "float32" | "bfloat16" | "int64"
    high: int | None = None  # integer inputs: values lie in [0, high)

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def dynamic(self) -> bool:
        return any(isinstance(d, str) for d in self.shape)

    def at(self, dims: dict[str, int]) -> "TensorSpec":
        return dataclasses.replace(self, shape=tuple(dim_value(d, dims) for d in self.shape))

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Graph:
    name: str
    component: str  # the network it runs: "t5" | "clip" | "dit" | "vae"
    precision: str  # "fp32" | "bf16"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    first: bool = False  # VAE: the first chunk step

    @property
    def compute_dtype(self) -> torch.dtype:
        dtype = COMPUTE_DTYPE[self.precision]
        return clip_run_dtype(dtype) if self.component == "clip" else dtype  # fp16 in bf16 builds

    @property
    def dynamic(self) -> bool:
        return any(s.dynamic for s in self.inputs)

    def at(self, dims: dict[str, int]) -> "Graph":
        """The graph with every dynamic dim fixed at `dims` (T, hp, wp)."""
        return dataclasses.replace(self, inputs=tuple(s.at(dims) for s in self.inputs),
                                   outputs=tuple(s.at(dims) for s in self.outputs))


@dataclass(frozen=True)
class EngineShape:
    """Output video a static engine folder is built for: pixel width x height and frame count."""
    name: str
    width: int
    height: int
    frame_num: int
    dynamic = False

    def latent(self, preset: Preset) -> tuple[int, int, int]:
        """(T, h, w) of the latent grid."""
        st, sh, sw = preset.vae.stride
        return (self.frame_num - 1) // st + 1, self.height // sh, self.width // sw

    def to_json(self, preset: Preset) -> dict:
        return {"name": self.name, "dynamic": False, "width": self.width, "height": self.height,
                "frame_num": self.frame_num, "latent": list(self.latent(preset))}


@dataclass(frozen=True)
class Profile:
    """One optimization profile of a dynamic engine: min / opt / max root dims (T, hp, wp)."""
    min: tuple[int, int, int]
    opt: tuple[int, int, int]
    max: tuple[int, int, int]

    def holds(self, dims: tuple[int, int, int]) -> bool:
        return all(lo <= d <= hi for lo, d, hi in zip(self.min, dims, self.max))

    def to_json(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class DynamicShape:
    """The grids a dynamic engine folder serves: every latent grid that `latent_grid` gives for a first
    frame of aspect ratio 1:max_aspect .. max_aspect:1 at the area of each of `sizes`, and frame counts
    frames[0]..frames[1]. Two profiles (TensorRT optimization profiles; ONNX Runtime needs none), each a
    box of (T, hp, wp): landscape (h <= w, opt at the model's default size) and portrait (h >= w, opt
    at its transpose). Two boxes, not one: a single box over both orientations would span
    long-side x long-side, which TensorRT sizes its activation memory for."""
    name: str
    sizes: tuple[str, ...]
    frames: tuple[int, int]
    max_aspect: float
    profiles: tuple[Profile, ...]
    dynamic = True

    def dims(self, preset: Preset, frame_num: int, height: int, width: int) -> tuple[int, int, int]:
        """Root dims (T, hp, wp) of an output video."""
        sp = preset.vae.stride[1] * preset.dit.patch_size[1]
        return (frame_num - 1) // preset.vae.stride[0] + 1, height // sp, width // sp

    def profile_of(self, preset: Preset, frame_num: int, height: int, width: int) -> int | None:
        """Index of the first profile serving this video, or None."""
        sp = preset.vae.stride[1] * preset.dit.patch_size[1]
        if height % sp or width % sp or (frame_num - 1) % preset.vae.stride[0]:
            return None
        d = self.dims(preset, frame_num, height, width)
        return next((i for i, p in enumerate(self.profiles) if p.holds(d)), None)

    def envelope(self) -> dict[str, tuple[int, int]]:
        """Per root dim, (min, max) over every profile (the ranges the ONNX graph is exported for)."""
        return {n: (min(p.min[i] for p in self.profiles), max(p.max[i] for p in self.profiles))
                for i, n in enumerate(DIMS)}

    def opt_dims(self) -> dict[str, int]:
        return dict(zip(DIMS, self.profiles[0].opt))

    def to_json(self, preset: Preset) -> dict:
        return {"name": self.name, "dynamic": True, "sizes": list(self.sizes), "frames": list(self.frames),
                "max_aspect": self.max_aspect, "profiles": [p.to_json() for p in self.profiles]}


def grid_profiles(preset: Preset, sizes, frames: tuple[int, int], max_aspect: float) -> tuple[Profile, ...]:
    """The landscape and portrait boxes of every grid `latent_grid` gives within these limits."""
    st, s, patch = preset.vae.stride[0], preset.vae.stride[1], preset.dit.patch_size[1]
    areas = [math.prod(int(v) for v in size.split("*")) for size in sizes]
    aspects = [max_aspect ** (i / 400) for i in range(-400, 401)]  # first frame H/W, log-spaced
    aspects += [int(h) / int(w) for w, h in (size.split("*") for size in sizes)]
    grids = set()
    for area in areas:
        for a in aspects:
            with contextlib.suppress(ValueError):  # too elongated for a small area: not an output grid
                grids.add(latent_grid((a, 1.0), area, s, patch))
    t_lo, t_hi = (frames[0] - 1) // st + 1, (frames[1] - 1) // st + 1
    t_opt = min(max((preset.frame_num - 1) // st + 1, t_lo), t_hi)
    # opt: the model's default size, or (a class without it) the default aspect at the class's largest area
    w0, h0 = (int(v) for v in preset.default_size.split("*"))
    oh, ow = latent_grid((h0, w0), w0 * h0 if preset.default_size in sizes else max(areas), s, patch)
    out = []
    for landscape in (True, False):
        box = [(h // patch, w // patch) for h, w in grids if (h <= w if landscape else h >= w)]
        opt = (min(oh, ow), max(oh, ow)) if landscape else (max(oh, ow), min(oh, ow))
        out.append(Profile((t_lo, min(b[0] for b in box), min(b[1] for b in box)),
                           (t_opt, opt[0] // patch, opt[1] // patch),
                           (t_hi, max(b[0] for b in box), max(b[1] for b in box))))
    return tuple(out)


def _shapes(*rows) -> dict[str, EngineShape]:
    return {name: EngineShape(name, w, h, f) for name, w, h, f in rows}


_SHAPES_14B = _shapes(("720p", 1280, 720, 81), ("720p-portrait", 720, 1280, 81), ("480p", 832, 480, 81),
                      ("480p-portrait", 480, 832, 81), ("1024-square", 1024, 1024, 81))
_SHAPES_TINY = _shapes(("tiny", 64, 64, 9), ("tiny-wide", 96, 64, 9), ("tiny-tall", 64, 96, 9))
# Static shapes per model preset. Each is what `latent_grid` gives for a first frame of exactly that
# aspect ratio at the preset's size of that area.
ENGINE_SHAPES: dict[str, dict[str, EngineShape]] = {
    "flf2v-14B": _SHAPES_14B,
    "i2v-14B": _SHAPES_14B,
    "tiny": _SHAPES_TINY,
    "tiny-i2v": _SHAPES_TINY,
    "small": _shapes(("small", 256, 144, 17), ("small-portrait", 144, 256, 17), ("small-square", 128, 128, 17)),
}
MAX_ASPECT = 2.4  # dynamic shapes serve first frames from 1:2.4 to 2.4:1 (21:9 is 2.33)
# Dynamic shapes per model preset: (name, sizes (None: all the preset's), frame range). The first is the
# default build: every official size and aspect ratio, 5..81 frames for the 14B models.
DYNAMIC_SHAPES: dict[str, tuple] = {
    "flf2v-14B": (("dynamic", None, (5, 81)), ("dynamic-480p", ("832*480", "480*832"), (5, 81))),
    "i2v-14B": (("dynamic", None, (5, 81)), ("dynamic-480p", ("832*480", "480*832"), (5, 81))),
    "tiny": (("dynamic", None, (5, 17)),),
    "tiny-i2v": (("dynamic", None, (5, 17)),),
    "small": (("dynamic", None, (5, 33)),),
}
DEFAULT_SHAPE = "dynamic"


def engine_shapes(preset: Preset) -> dict[str, EngineShape]:
    """The named static shapes of `preset`."""
    if preset.name not in ENGINE_SHAPES:
        raise ValueError(f"no engine shapes for model preset {preset.name!r}; known: {', '.join(ENGINE_SHAPES)}")
    return ENGINE_SHAPES[preset.name]


@functools.cache
def dynamic_shapes(preset: Preset) -> dict[str, DynamicShape]:
    """The named dynamic shapes of `preset`, the default build first."""
    out = {}
    for name, sizes, frames in DYNAMIC_SHAPES.get(preset.name, ()):
        sizes = tuple(sizes or preset.sizes)
        out[name] = DynamicShape(name, sizes, frames, MAX_ASPECT, grid_profiles(preset, sizes, frames, MAX_ASPECT))
    return out


def custom_shape(preset: Preset, name: str) -> EngineShape:
    """A static shape spelled `<W>x<H>x<frames>`, e.g. 1232x512x81 (any grid the model can run)."""
    try:
        w, h, f = (int(v) for v in name.split("x"))
    except ValueError:
        raise ValueError(f"unknown shape {name!r} for {preset.name}; choose one of "
                         f"{', '.join([*dynamic_shapes(preset), *engine_shapes(preset)])} or <W>x<H>x<frames>") from None
    sp = preset.vae.stride[1] * preset.dit.patch_size[1]
    if w <= 0 or h <= 0 or w % sp or h % sp or f < 1 or (f - 1) % preset.vae.stride[0]:
        raise ValueError(f"shape {name}: width and height must be positive multiples of {sp} and frames 4n+1")
    if w * h > 1.1 * max(math.prod(map(int, s.split("*"))) for s in preset.sizes):  # an area, give or take rounding
        raise ValueError(f"shape {name}: {w}x{h} is larger than any video {preset.name} makes; give a grid within "
                         f"the area of one of its sizes, {', '.join(preset.sizes)}")
    return EngineShape(name, w, h, f)


def get_shape(preset: Preset, name: str | None = None) -> EngineShape | DynamicShape:
    """The named shape of `preset`: dynamic (the default, `dynamic`), static, or `<W>x<H>x<frames>`."""
    dyn = dynamic_shapes(preset)
    if name is None:
        return next(iter(dyn.values())) if dyn else next(iter(engine_shapes(preset).values()))
    if name in dyn:
        return dyn[name]
    shapes = engine_shapes(preset)
    return shapes[name] if name in shapes else custom_shape(preset, name)


def _root_dims(preset: Preset, shape) -> tuple:
    """(T, hp, wp): ints for a static shape, sympy symbols for a dynamic one."""
    if shape.dynamic:
        import sympy
        return sympy.symbols(" ".join(DIMS), integer=True, positive=True)
    T, h, w = shape.latent(preset)
    p = preset.dit.patch_size[1]
    sp = preset.vae.stride[1] * p
    if shape.height % sp or shape.width % sp:
        raise ValueError(f"engine shape {shape.name}: {shape.width}x{shape.height} is not a multiple of {sp}")
    return T, h // p, w // p


def _vae_cache_shapes(preset: Preset, H, W, h, w) -> tuple[list, list]:
    from flf2v.models.vae import WanVAE
    with torch.device("meta"):
        vae = WanVAE(preset.vae)
    return vae.encoder_cache_shapes(1, H, W), vae.decoder_cache_shapes(1, h, w)


def graphs(preset: Preset, shape: EngineShape | DynamicShape, precision: str, cfg_batch=(1, 2)) -> list[Graph]:
    """Every graph of an engine folder, in build order. A dynamic shape gives graphs whose latent frames,
    heights and widths are dims "k*T", "k*hp", "k*wp" (see DIMS; `Graph.at` fixes them)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    d, f32, i64 = preset.dit, "float32", "int64"
    cache = DTYPE_NAMES[COMPUTE_DTYPE[precision]]
    T, hp, wp = _root_dims(preset, shape)
    p, s = d.patch_size[1], preset.vae.stride[1]
    h, w, H, W = p * hp, p * wp, s * p * hp, s * p * wp

    def S(name, dims, dtype, high=None):
        return TensorSpec(name, tuple(_dim(v) for v in dims), dtype, high)

    L, n_img = preset.t5.text_len, 2 if d.model_type == "flf2v" else 1
    out = [
        Graph("t5", "t5", precision, (S("ids", (2, L), i64, preset.t5.vocab), S("mask", (2, L), i64, 2)),
              (S("context", (2, L, preset.t5.dim), f32),)),
        Graph("clip", "clip", precision, (S("pixels", (n_img, 3, preset.clip.image_size, preset.clip.image_size),
                                            f32),),
              (S("clip_fea", (n_img, preset.clip.num_tokens, preset.clip.dim), f32),)),
    ]
    if d.patch_size[0] != 1:
        raise ValueError(f"DiT graphs assume a temporal patch of 1, got {d.patch_size}")
    for b in cfg_batch:
        x, y = S("x", (b, d.out_dim, T, h, w), f32), S("y", (b, d.in_dim - d.out_dim, T, h, w), f32)
        t = S("t", (b,), i64, d.num_train_timesteps + 1)  # t in 0..1000: dpm++ starts at t = 1000
        v, hidden = S("v", (b, d.out_dim, T, h, w), f32), S("hidden", (b, T, hp, wp, d.dim), f32)
        out.append(Graph(f"dit_b{b}", "dit", precision, (
            x, t, S("context", (b, d.text_len, d.text_dim), f32), S("clip_fea", (b, d.clip_tokens, d.clip_dim), f32),
            y), (v, hidden)))
        out.append(Graph(f"dit_cached_b{b}", "dit", precision,
                         (x, S("x_prev", x.shape, f32), t, y, hidden), (v,)))
    enc, dec = _vae_cache_shapes(preset, H, W, h, w)
    z_dim, st = preset.vae.z_dim, preset.vae.stride[0]
    for name in VAE_GRAPHS:
        decode, first = "decode" in name, name.endswith("first")
        frames = (1, 3, 1 if first else st, H, W)
        latent = (1, z_dim, 1, h, w)
        caches = dec if decode else enc
        cin = tuple(S(f"cache_in.{i}", tuple(c), cache) for i, c in enumerate(caches))
        cout = tuple(S(f"cache_out.{i}", tuple(c), cache) for i, c in enumerate(caches))
        x = S("z", latent, f32) if decode else S("x", frames, f32)
        y = S("frames", frames, f32) if decode else S("z", latent, f32)
        out.append(Graph(name, "vae", precision, (x, *cin), (y, *cout), first=first))
    return out


def get_graph(preset: Preset, shape: EngineShape | DynamicShape, precision: str, name: str) -> Graph:
    for g in graphs(preset, shape, precision):
        if g.name == name:
            return g
    raise ValueError(f"unknown graph {name!r}")


def sample_inputs(graph: Graph, seed: int = 0) -> list[torch.Tensor]:
    """Random inputs that respect the contract (a prefix text mask, zero caches for a first VAE step)."""
    if graph.dynamic:
        raise ValueError(f"{graph.name} has dynamic dims; fix them first with graph.at(dims)")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in graph.inputs:
        if s.name == "mask":
            lengths = torch.tensor([s.shape[1] * 3 // 4, s.shape[1] // 3])
            v = (torch.arange(s.shape[1])[None] < lengths[:, None]).long()
        elif s.high is not None:
            v = torch.randint(0, s.high, s.shape, generator=gen)
        elif s.name.startswith("cache_in") and graph.first:
            v = torch.zeros(s.shape)
        elif s.name == "x" and graph.component == "vae":
            v = torch.rand(s.shape, generator=gen) * 2 - 1
        else:
            v = torch.randn(s.shape, generator=gen)
        out.append(v.to(s.torch_dtype))
    if graph.component == "t5":  # padding tokens are id 0, as the tokenizer writes them
        out[0] = out[0] * out[1]
    return out


# ---- adapters: the graph's inputs positionally in, its outputs as a tuple out ------------------------

class OneOutput(nn.Module):
    """T5, CLIP or DiT; the output is returned fp32 (CLIP computes in the weights' dtype)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *inputs):
        return (self.net(*inputs).float(),)


class DiTFull(nn.Module):
    """The DiT returning the blocks' output too (graphs `dit_b*`)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *inputs):
        return self.net(*inputs, return_hidden=True)


class DiTCached(nn.Module):
    """The DiT step that skips the blocks (graphs `dit_cached_b*`)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *inputs):
        return (self.net.forward_cached(*inputs),)


class VAEStep(nn.Module):
    def __init__(self, net: nn.Module, decode: bool, first: bool):
        super().__init__()
        self.net, self.decode, self.first = net, decode, first

    def forward(self, x, *caches):
        step = self.net.decode_chunk if self.decode else self.net.encode_chunk
        out, new = step(x, list(caches), self.first)
        return (out, *new)


def module(graph: Graph, models) -> nn.Module:
    """Adapter for `graph` around `models[graph.component]` (a dict of the four networks)."""
    net = models[graph.component]
    if graph.component == "vae":
        return VAEStep(net, "decode" in graph.name, graph.first).eval()
    if graph.component == "dit":
        return (DiTCached if graph.name.startswith("dit_cached") else DiTFull)(net).eval()
    return OneOutput(net).eval()
