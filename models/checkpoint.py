"""Loading an official Wan2.1 checkpoint directory (`--ckpt_dir`) unchanged.

Every network is built on the meta device and filled tensor by tensor, each cast to the run dtype as
it is read, so loading never holds two copies of the weights: the sharded fp32 safetensors of the
DiT stream through one tensor at a time, and the `.pth` files are memory-mapped with
`torch.load(weights_only=True, mmap=True)`, which refuses pickles that would run code.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open

from .config import PRESETS, DiTConfig, Preset

DIT_CONFIG = "config.json"
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_SINGLE = "diffusion_pytorch_model.safetensors"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER = "google/umt5-xxl"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
CLIP_TOKENIZER = "xlm-roberta-large"
VAE_FILE = "Wan2.1_VAE.pth"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the network."""


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path}: missing ({what}); point --ckpt_dir at a complete Wan2.1 checkpoint "
                              f"or write a test one with `flf2v-make-tiny DIR`")
    return path


def read_dit_config(ckpt_dir: str | os.PathLike, base: DiTConfig | None = None) -> DiTConfig:
    path = _need(Path(ckpt_dir) / DIT_CONFIG, "DiT config")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    try:
        return DiTConfig.from_json_dict(raw, base)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def preset_for(ckpt_dir: str | os.PathLike) -> Preset:
    """The preset whose DiT matches the checkpoint's config.json (real 14B or a generated test one)."""
    raw = read_dit_config(ckpt_dir)
    for p in PRESETS.values():
        d = p.dit
        if (d.model_type, d.dim, d.num_layers, d.num_heads, d.ffn_dim, d.text_dim, d.clip_dim) == (
                raw.model_type, raw.dim, raw.num_layers, raw.num_heads, raw.ffn_dim, raw.text_dim, raw.clip_dim):
            return p
    raise CheckpointError(f"{Path(ckpt_dir) / DIT_CONFIG}: no preset has dim={raw.dim}, "
                          f"num_layers={raw.num_layers}, model_type={raw.model_type!r}; known presets: "
                          f"{', '.join(PRESETS)}")


# ---------------------------------------------------------------------------------------------------
# tensor sources: name -> loader, so each tensor is read (and cast) only when it is assigned


def dit_tensor_source(ckpt_dir: str | os.PathLike) -> dict[str, Callable[[], torch.Tensor]]:
    """Lazy getters for every DiT tensor of a sharded (index.json) or single-file safetensors DiT."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / DIT_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
    elif (ckpt_dir / DIT_SINGLE).exists():
        weight_map = None
    else:
        raise CheckpointError(f"{index}: missing (DiT weights); point --ckpt_dir at a complete Wan2.1 "
                              f"checkpoint or write a test one with `flf2v-make-tiny DIR`")
    shards = sorted(set(weight_map.values())) if weight_map else [DIT_SINGLE]
    handles = {}
    for name in shards:
        path = ckpt_dir / name
        if weight_map is not None and not path.exists():
            raise CheckpointError(f"{index}: shard {name} is listed but missing from {ckpt_dir}")
        try:
            handles[name] = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e}); re-download it") from None
    if weight_map is None:
        weight_map = {k: DIT_SINGLE for k in handles[DIT_SINGLE].keys()}
    for key, name in weight_map.items():
        if key not in handles[name].keys():
            raise CheckpointError(f"{ckpt_dir / name}: index lists {key!r} but the shard does not hold it")

    def getter(key: str, name: str) -> Callable[[], torch.Tensor]:
        def get() -> torch.Tensor:
            try:
                return handles[name].get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{ckpt_dir / name}: cannot read {key!r} ({e}); the file is damaged") from None

        def rows(start: int, stop: int) -> torch.Tensor:  # only these rows leave the file (sharded loading)
            try:
                return handles[name].get_slice(key)[start:stop]
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{ckpt_dir / name}: cannot read {key!r} ({e}); the file is damaged") from None
        get.rows = rows
        return get

    return {k: getter(k, n) for k, n in weight_map.items()}


def pth_tensor_source(path: str | os.PathLike, prefix: str = "") -> dict[str, Callable[[], torch.Tensor]]:
    """Lazy getters for a `.pth` state dict, memory-mapped; keys under `prefix` with it stripped."""
    path = _need(Path(path), "weights")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        # zip/pickle damage and truncation surface as RuntimeError from torch.load
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0]}); re-download it") from None
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e}); re-download it") from None
    except Exception as e:
        if type(e).__name__ == "UnpicklingError":  # weights_only refused a non-tensor payload
            raise CheckpointError(f"{path}: refused: the file holds Python objects other than tensors "
                                  f"(possibly malicious); use the official checkpoint file") from None
        raise
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if k.startswith(prefix):
            out[k[len(prefix):]] = (lambda v=v: v)
    return out


# ---------------------------------------------------------------------------------------------------


def check_keys(expected, source: dict, origin: str, ignore: Callable[[str], bool] = lambda k: False) -> None:
    """CheckpointError unless `source` holds exactly the `expected` keys (up to those `ignore` accepts)."""
    have = {k for k in source if not ignore(k)}
    missing = sorted(set(expected) - have)
    unexpected = sorted(have - set(expected))
    if missing:
        raise CheckpointError(f"{origin}: missing key {missing[0]!r}" + (f" (+{len(missing) - 1} more)"
                              if len(missing) > 1 else "") + "; the file is incomplete or not this model")
    if unexpected:
        raise CheckpointError(f"{origin}: unexpected key {unexpected[0]!r}" + (f" (+{len(unexpected) - 1} more)"
                              if len(unexpected) > 1 else "") + "; the file belongs to another model")


def fill(model: torch.nn.Module, source: dict[str, Callable[[], torch.Tensor]], dtype: torch.dtype,
         origin: str, ignore: Callable[[str], bool] = lambda k: False, device=None) -> torch.nn.Module:
    """Assign every parameter/buffer of a meta-built `model` from `source`, cast one tensor at a time.

    Floating tensors go to `dtype` (and `device`, if given); non-persistent buffers (RoPE tables, built
    real in `__init__`) are left as they are. Key sets must match exactly, up to the keys `ignore`
    accepts. Keys that share one getter (tied weights) get one converted tensor and stay tied.
    """
    expected = model.state_dict()
    check_keys(expected, source, origin, ignore)
    loaded, converted = {}, {}
    for key, ref in expected.items():
        t = source[key]()
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{origin}: {key!r} has shape {tuple(t.shape)}, the model needs "
                                  f"{tuple(ref.shape)}; the checkpoint does not match its config")
        getter = id(source[key])  # alive in `source` all along: a stable identity, unlike id(t)
        if getter not in converted:
            converted[getter] = t.to(device, dtype) if t.is_floating_point() else t.to(device)
        loaded[key] = converted[getter]
    model.load_state_dict(loaded, strict=True, assign=True)
    return model.eval().requires_grad_(False)


COMPONENTS = ("dit", "t5", "clip", "vae")


def build_meta(ckpt_dir, component: str, preset: Preset, **kw) -> torch.nn.Module:
    """The network of `component` on the meta device (its fixed tables are built real on the CPU)."""
    from .clip import CLIPVisual
    from .dit import WanDiT
    from .t5 import UMT5Encoder
    from .vae import WanVAE
    if kw and component != "dit":
        raise ValueError(f"{sorted(kw)} apply to the DiT only, not to {component!r}")
    with torch.device("meta"):
        if component == "dit":
            return WanDiT(read_dit_config(ckpt_dir, preset.dit), **kw)
        return {"t5": lambda: UMT5Encoder(preset.t5), "clip": lambda: CLIPVisual(preset.clip),
                "vae": lambda: WanVAE(preset.vae)}[component]()


def tensor_source(ckpt_dir, component: str) -> tuple[dict[str, Callable[[], torch.Tensor]], str, Callable]:
    """(lazy tensors keyed as the network names them, the file they come from, keys to skip)."""
    d = Path(ckpt_dir)
    if component == "dit":
        return dit_tensor_source(d), str(d / DIT_INDEX), lambda k: False
    if component == "clip":
        from .clip import ignored_keys
        ignored = ignored_keys(preset_for(d).clip)
        # the file holds both CLIP towers; only `visual.*` (minus the unused tail) belongs to the model
        return (pth_tensor_source(d / CLIP_FILE, prefix="visual."), str(d / CLIP_FILE),
                lambda k: ignored("visual." + k))
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; one of {COMPONENTS}")
    path = d / {"t5": T5_FILE, "vae": VAE_FILE}[component]
    return pth_tensor_source(path), str(path), lambda k: False


def load(ckpt_dir, component: str, dtype=torch.float32, preset: Preset | None = None, **kw) -> torch.nn.Module:
    """`component` ("dit", "t5", "clip" or "vae") of an official checkpoint, weights in `dtype` (a DiT with
    LoRAs merged in: models/lora.load_dit)."""
    preset = preset or preset_for(ckpt_dir)
    model = build_meta(ckpt_dir, component, preset, **kw)
    source, origin, ignore = tensor_source(ckpt_dir, component)
    return fill(model, source, dtype, origin, ignore)


def load_dit(ckpt_dir, dtype=torch.float32, preset: Preset | None = None, **kw):
    return load(ckpt_dir, "dit", dtype, preset, **kw)


def dit_shapes(ckpt_dir) -> dict[str, tuple[int, ...]]:
    """Official key -> shape of the checkpoint's DiT, from a meta-device build (no weights read)."""
    model = build_meta(ckpt_dir, "dit", preset_for(ckpt_dir))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_t5(ckpt_dir, dtype=torch.float32, preset: Preset | None = None):
    return load(ckpt_dir, "t5", dtype, preset)


def load_clip(ckpt_dir, dtype=torch.float32, preset: Preset | None = None):
    return load(ckpt_dir, "clip", dtype, preset)


def load_vae(ckpt_dir, dtype=torch.float32, preset: Preset | None = None):
    return load(ckpt_dir, "vae", dtype, preset)


def load_tokenizer(ckpt_dir, preset: Preset | None = None):
    from .tokenizer import T5Tokenizer
    preset = preset or preset_for(ckpt_dir)
    folder = _need(Path(ckpt_dir) / T5_TOKENIZER, "umT5 tokenizer folder")
    return T5Tokenizer(folder, preset.t5.text_len)


def weight_files(ckpt_dir: str | os.PathLike) -> Iterable[Path]:
    """Every weight file of a checkpoint (for fingerprints and size accounting)."""
    d = Path(ckpt_dir)
    yield from sorted(d.glob("diffusion_pytorch_model*.safetensors"))
    for name in (T5_FILE, CLIP_FILE, VAE_FILE):
        if (d / name).exists():
            yield d / name
