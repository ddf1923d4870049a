"""Frozen configs for the four Wan2.1 networks, bundled into named presets.

`flf2v-14B` and `i2v-14B` carry the real dimensions (the DiT part is re-read from a checkpoint's
config.json when one is given); `tiny` keeps every structural choice of the real model (z_dim 16,
in_dim 36, VAE dim_mult [1,2,4,4], per-layer T5 position bias, penultimate CLIP features) at toy
widths so tests and the demo run in seconds on a CPU; `small` is wide enough that the DiT dominates
a CPU run, for benchmarks.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


def _field(name: str, v, like):
    """`v`, a config.json value, checked to be of the kind of `like` (the default): "num_heads": 0 was a
    ZeroDivisionError traceback, "patch_size": null a TypeError deep in the model."""
    def count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x > 0
    if isinstance(like, tuple):
        ok, want = isinstance(v, tuple) and len(v) == len(like) and all(map(count, v)), \
            f"a list of {len(like)} positive integers"
    elif isinstance(like, int):
        ok, want = count(v), "a positive integer"
    elif isinstance(like, float):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        want, v = "a positive number", float(v) if ok else v
    else:
        ok, want = isinstance(v, str), "a string"
    if not ok:
        raise ValueError(f"{name} must be {want}, got {_json_repr(v)}")
    return v


def _json_repr(v) -> str:
    return "null" if v is None else repr(list(v) if isinstance(v, tuple) else v)


@dataclass(frozen=True)
class DiTConfig:
    model_type: str = "flf2v"  # "flf2v" (2 CLIP frames, learned emb_pos) or "i2v" (1 frame)
    in_dim: int = 36  # 16 noise + 4 mask + 16 VAE latent channels
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096  # width of the T5 features (absent from the real config.json)
    clip_dim: int = 1280  # width of the CLIP features fed to img_emb
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    text_len: int = 512
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    rope_max_pos: int = 1024
    rope_theta: float = 10000.0
    num_train_timesteps: int = 1000
    # derived
    head_dim: int = field(init=False)
    rope_split: tuple[int, int, int] = field(init=False)  # complex pairs for (frame, height, width)
    clip_tokens: int = field(init=False)  # image tokens prepended to the text context

    def __post_init__(self):
        if self.model_type not in ("flf2v", "i2v"):
            raise ValueError(f"model_type must be 'flf2v' or 'i2v', got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        d = self.dim // self.num_heads
        if d % 2:
            raise ValueError(f"head_dim {d} must be even for RoPE")
        object.__setattr__(self, "head_dim", d)
        # Wan splits the head dim as d - 4*(d//6), 2*(d//6), 2*(d//6) real channels: 44/42/42 for 128.
        object.__setattr__(self, "rope_split", ((d - 4 * (d // 6)) // 2, d // 6, d // 6))
        object.__setattr__(self, "clip_tokens", 257 * (2 if self.model_type == "flf2v" else 1))

    @classmethod
    def from_json_dict(cls, d: dict, base: "DiTConfig | None" = None) -> "DiTConfig":
        """Config from an official config.json; keys it lacks come from `base` (or the defaults)."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        base = base or cls()
        kw = {k: _field(k, tuple(v) if isinstance(v, list) else v, getattr(base, k)) for k, v in d.items()
              if k in names}
        return dataclasses.replace(base, **kw)

    def to_json_dict(self) -> dict:
        """The official config.json keys (plus text_dim/clip_dim when they differ from the real model)."""
        d = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": self.model_type,
             "in_dim": self.in_dim, "dim": self.dim, "ffn_dim": self.ffn_dim, "freq_dim": self.freq_dim,
             "out_dim": self.out_dim, "num_heads": self.num_heads, "num_layers": self.num_layers,
             "text_len": self.text_len, "eps": self.eps, "patch_size": list(self.patch_size),
             "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True}
        if self.text_dim != 4096:
            d["text_dim"] = self.text_dim
        if self.clip_dim != 1280:
            d["clip_dim"] = self.clip_dim
        return d


@dataclass(frozen=True)
class T5Config:
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    ffn_dim: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    text_len: int = 512
    eps: float = 1e-6
    head_dim: int = field(init=False)

    def __post_init__(self):
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")
        object.__setattr__(self, "head_dim", self.dim_attn // self.num_heads)


@dataclass(frozen=True)
class CLIPConfig:
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: int = 4
    num_heads: int = 16
    num_layers: int = 32  # the runtime runs num_layers - 1 of them: it takes penultimate features
    out_dim: int = 1024  # projection head width (stored in the checkpoint, unused for video)
    eps: float = 1e-5
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    num_patches: int = field(init=False)
    num_tokens: int = field(init=False)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        n = (self.image_size // self.patch_size) ** 2
        object.__setattr__(self, "num_patches", n)
        object.__setattr__(self, "num_tokens", n + 1)


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # official spelling
    mean: tuple[float, ...] = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
    std: tuple[float, ...] = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
    stride: tuple[int, int, int] = field(init=False)  # (time, height, width) compression

    def __post_init__(self):
        if len(self.mean) != self.z_dim or len(self.std) != self.z_dim:
            raise ValueError(f"mean/std need z_dim={self.z_dim} entries")
        t = 2 ** sum(self.temperal_downsample)
        s = 2 ** (len(self.dim_mult) - 1)
        object.__setattr__(self, "stride", (t, s, s))


# The official default negative prompt (github.com/Wan-Video/Wan2.1, wan/configs): shared_config.py's
# sample_neg_prompt; wan_i2v_14B.py prefixes "镜头晃动，" (camera shake) for I2V, and __init__.py's
# flf2v_14B, a copy of the I2V config, prefixes "镜头切换，" (shot change) to that.
SHARED_NEG_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
SAMPLE_NEG_PROMPTS = {"i2v": "镜头晃动，" + SHARED_NEG_PROMPT, "flf2v": "镜头切换，镜头晃动，" + SHARED_NEG_PROMPT}

# Output sizes ("W*H", the official --size spelling) each preset accepts.
SIZES_14B = ("1280*720", "720*1280", "832*480", "480*832", "1024*1024")


@dataclass(frozen=True)
class Preset:
    name: str
    dit: DiTConfig
    t5: T5Config
    clip: CLIPConfig
    vae: VAEConfig
    sizes: tuple[str, ...]
    default_size: str
    frame_num: int = 81
    sample_steps: int = 50
    sample_shift: float = 16.0
    sample_guide_scale: float = 5.0
    # used when no negative prompt is given; None: the official one of the DiT's model type (SAMPLE_NEG_PROMPTS)
    sample_neg_prompt: str | None = None

    def __post_init__(self):
        if self.sample_neg_prompt is None:
            object.__setattr__(self, "sample_neg_prompt", SAMPLE_NEG_PROMPTS[self.dit.model_type])


def _tiny_parts(model_type: str, num_heads: int = 2):
    dit = DiTConfig(model_type=model_type, dim=64, ffn_dim=128, text_dim=32, clip_dim=64, num_heads=num_heads,
                    num_layers=2)
    t5 = T5Config(vocab=384, dim=32, dim_attn=32, ffn_dim=64, num_heads=4, num_layers=2)
    clip = CLIPConfig(dim=64, num_heads=4, num_layers=3, out_dim=32)
    vae = VAEConfig(dim=8)
    return dit, t5, clip, vae


PRESETS: dict[str, Preset] = {
    "flf2v-14B": Preset("flf2v-14B", DiTConfig(model_type="flf2v"), T5Config(), CLIPConfig(), VAEConfig(),
                        SIZES_14B, "1280*720"),
    "i2v-14B": Preset("i2v-14B", DiTConfig(model_type="i2v"), T5Config(), CLIPConfig(), VAEConfig(),
                      SIZES_14B, "1280*720", sample_steps=40, sample_shift=5.0),
    "tiny": Preset("tiny", *_tiny_parts("flf2v"), sizes=("64*64", "96*64", "64*96"), default_size="64*64",
                   frame_num=9, sample_steps=4),
    "tiny-i2v": Preset("tiny-i2v", *_tiny_parts("i2v"), sizes=("64*64", "96*64", "64*96"),
                       default_size="64*64", frame_num=9, sample_steps=4),
    # 4 attention heads, so Ulysses runs over 4 ranks (runtime/parallel.py tests)
    "tiny-4h": Preset("tiny-4h", *_tiny_parts("flf2v", num_heads=4), sizes=("64*64", "96*64", "64*96"),
                      default_size="64*64", frame_num=9, sample_steps=4),
    # DiT-dominated on a CPU (about 70% of the reference's time): the VAE's 3D convs run far below the
    # DiT's matmul rate there, so the VAE stays narrow.
    "small": Preset("small", DiTConfig(dim=768, ffn_dim=2304, text_dim=256, clip_dim=256, num_heads=6,
                                       num_layers=6),
                    T5Config(vocab=384, dim=256, dim_attn=256, ffn_dim=512, num_heads=4, num_layers=2),
                    CLIPConfig(dim=256, num_heads=4, num_layers=3, out_dim=128), VAEConfig(dim=8),
                    sizes=("256*144", "144*256", "128*128"), default_size="256*144", frame_num=17,
                    sample_steps=10),
}


def latent_grid(img_hw: tuple[float, float], max_area: int, stride: int, patch: int) -> tuple[int, int]:
    """Official sizing (wan/first_last_frame2video.py): the latent (h, w) keeps the first frame's aspect
    ratio within `max_area` pixels, each a multiple of `patch`. ValueError when a side rounds to zero."""
    h, w = img_hw
    aspect = h / w
    lat_h = round(math.sqrt(max_area * aspect) // stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect) // stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise ValueError(f"a {w:g}x{h:g} frame is too elongated for max area {max_area}; crop it closer to the "
                         f"output aspect ratio")
    return lat_h, lat_w


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
