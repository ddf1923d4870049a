"""One I/O contract per exported graph: it drives export, engine builds, runtime buffers and tests.

Graphs of one engine folder (one model preset, one output grid, one precision):

| graph | inputs | outputs |
|---|---|---|
| `t5` | ids, mask int64 [2, text_len] (prompt, negative prompt) | context f32 [2, text_len, text_dim] |
| `clip` | pixels f32 [n, 3, 224, 224] (n = 2 FLF2V, 1 I2V) | clip_fea f32 [n, 257, clip_dim] |
| `dit_b1`, `dit_b2` | x f32 [B,16,T,h,w], t int64 [B], context f32 [B,text_len,text_dim], clip_fea f32 [B, clip_tokens, clip_dim], y f32 [B,20,T,h,w] | v f32 [B,16,T,h,w] |
| `vae_encode_first` / `_chunk` | x f32 [1,3,1 or 4,H,W] in [-1,1], cache_in.{i} | z f32 [1,16,1,h,w], cache_out.{i} |
| `vae_decode_first` / `_chunk` | z f32 [1,16,1,h,w], cache_in.{i} | frames f32 [1,3,1 or 4,H,W], cache_out.{i} |

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

from dataclasses import dataclass

import torch
from torch import nn

from flf2v.models.config import Preset

OPSET = 23  # ONNX Attention and RMSNormalization (TensorRT parses both from 10.15)
PRECISIONS = ("fp32", "bf16")
COMPUTE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.int64: "int64"}
TORCH_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
VAE_GRAPHS = ("vae_encode_first", "vae_encode_chunk", "vae_decode_first", "vae_decode_chunk")
WEIGHT_PREFIX = "net."  # adapters hold the network as `net`: ONNX initializer = "net." + checkpoint key


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32" | "bfloat16" | "int64"
    high: int | None = None  # integer inputs: values lie in [0, high)

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

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
        return COMPUTE_DTYPE[self.precision]


@dataclass(frozen=True)
class EngineShape:
    """Output video an engine folder is built for: pixel width x height and frame count."""
    name: str
    width: int
    height: int
    frame_num: int

    def latent(self, preset: Preset) -> tuple[int, int, int]:
        """(T, h, w) of the latent grid."""
        st, sh, sw = preset.vae.stride
        return (self.frame_num - 1) // st + 1, self.height // sh, self.width // sw

    def to_json(self, preset: Preset) -> dict:
        return {"name": self.name, "width": self.width, "height": self.height, "frame_num": self.frame_num,
                "latent": list(self.latent(preset))}


def _shapes(*rows) -> dict[str, EngineShape]:
    return {name: EngineShape(name, w, h, f) for name, w, h, f in rows}


_SHAPES_14B = _shapes(("720p", 1280, 720, 81), ("720p-portrait", 720, 1280, 81), ("480p", 832, 480, 81),
                      ("480p-portrait", 480, 832, 81), ("1024-square", 1024, 1024, 81))
_SHAPES_TINY = _shapes(("tiny", 64, 64, 9), ("tiny-wide", 96, 64, 9), ("tiny-tall", 64, 96, 9))
# Per model preset; the first entry is the default (the preset's default size and frame count). Each is
# what `runtime.pipeline.latent_grid` gives for a first frame of exactly that aspect ratio.
ENGINE_SHAPES: dict[str, dict[str, EngineShape]] = {
    "flf2v-14B": _SHAPES_14B,
    "i2v-14B": _SHAPES_14B,
    "tiny": _SHAPES_TINY,
    "tiny-i2v": _SHAPES_TINY,
    "small": _shapes(("small", 256, 144, 17), ("small-portrait", 144, 256, 17), ("small-square", 128, 128, 17)),
}


def engine_shapes(preset: Preset) -> dict[str, EngineShape]:
    if preset.name not in ENGINE_SHAPES:
        raise ValueError(f"no engine shapes for model preset {preset.name!r}; known: {', '.join(ENGINE_SHAPES)}")
    return ENGINE_SHAPES[preset.name]


def get_shape(preset: Preset, name: str | None = None) -> EngineShape:
    """The named engine shape of `preset` (its default one for None)."""
    shapes = engine_shapes(preset)
    if name is None:
        return next(iter(shapes.values()))
    if name not in shapes:
        raise ValueError(f"unknown shape preset {name!r} for {preset.name}; choose one of {', '.join(shapes)}")
    return shapes[name]


def _vae_cache_shapes(preset: Preset, shape: EngineShape) -> tuple[list, list]:
    from flf2v.models.vae import WanVAE
    with torch.device("meta"):
        vae = WanVAE(preset.vae)
    _, h, w = shape.latent(preset)
    return vae.encoder_cache_shapes(1, shape.height, shape.width), vae.decoder_cache_shapes(1, h, w)


def graphs(preset: Preset, shape: EngineShape, precision: str, cfg_batch=(1, 2)) -> list[Graph]:
    """Every graph of an engine folder, in build order."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    d, f32, i64 = preset.dit, "float32", "int64"
    cache = DTYPE_NAMES[COMPUTE_DTYPE[precision]]
    T, h, w = shape.latent(preset)
    H, W = shape.height, shape.width
    sp = preset.vae.stride[1] * d.patch_size[1]
    if H % sp or W % sp:
        raise ValueError(f"engine shape {shape.name}: {W}x{H} is not a multiple of {sp}")
    S = TensorSpec
    L, n_img = preset.t5.text_len, 2 if d.model_type == "flf2v" else 1
    out = [
        Graph("t5", "t5", precision, (S("ids", (2, L), i64, preset.t5.vocab), S("mask", (2, L), i64, 2)),
              (S("context", (2, L, preset.t5.dim), f32),)),
        Graph("clip", "clip", precision, (S("pixels", (n_img, 3, preset.clip.image_size, preset.clip.image_size),
                                            f32),),
              (S("clip_fea", (n_img, preset.clip.num_tokens, preset.clip.dim), f32),)),
    ]
    for b in cfg_batch:
        out.append(Graph(f"dit_b{b}", "dit", precision, (
            # t in 0..1000: dpm++ starts at t = 1000 (the official schedule)
            S("x", (b, d.out_dim, T, h, w), f32), S("t", (b,), i64, d.num_train_timesteps + 1),
            S("context", (b, d.text_len, d.text_dim), f32), S("clip_fea", (b, d.clip_tokens, d.clip_dim), f32),
            S("y", (b, d.in_dim - d.out_dim, T, h, w), f32)), (S("v", (b, d.out_dim, T, h, w), f32),)))
    enc, dec = _vae_cache_shapes(preset, shape)
    z_dim, st = preset.vae.z_dim, preset.vae.stride[0]
    for name in VAE_GRAPHS:
        decode, first = "decode" in name, name.endswith("first")
        frames = (1, 3, 1 if first else st, H, W)
        latent = (1, z_dim, 1, h, w)
        caches = dec if decode else enc
        cin = tuple(S(f"cache_in.{i}", tuple(s), cache) for i, s in enumerate(caches))
        cout = tuple(S(f"cache_out.{i}", tuple(s), cache) for i, s in enumerate(caches))
        x = S("z", latent, f32) if decode else S("x", frames, f32)
        y = S("frames", frames, f32) if decode else S("z", latent, f32)
        out.append(Graph(name, "vae", precision, (x, *cin), (y, *cout), first=first))
    return out


def get_graph(preset: Preset, shape: EngineShape, precision: str, name: str) -> Graph:
    for g in graphs(preset, shape, precision):
        if g.name == name:
            return g
    raise ValueError(f"unknown graph {name!r}")


def sample_inputs(graph: Graph, seed: int = 0) -> list[torch.Tensor]:
    """Random inputs that respect the contract (a prefix text mask, zero caches for a first VAE step)."""
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
    return OneOutput(net).eval()
