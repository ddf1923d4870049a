"""Loading an official Wan2.1 checkpoint directory (`--ckpt_dir`) unchanged.

Every network is built on the meta device and filled tensor by tensor, each cast to the run dtype as
it is read, so loading never holds two copies of the weights: the sharded fp32 safetensors of the
DiT stream through one tensor at a time, and the `.pth` files are memory-mapped with
`torch.load(weights_only=True, mmap=True)`, which refuses pickles that would run code.
"""
from __future__ import annotations

import functools
import json
import os
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open

from .config import PRESETS, DiTConfig, Preset
from .keymaps import dit_key_to_diffusers
from .quant import stored_dtype
from .layouts import OFFICIAL, CheckpointError, Layout, cache_folder, detect

DIT_CONFIG = "config.json"
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_SINGLE = "diffusion_pytorch_model.safetensors"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER = "google/umt5-xxl"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
CLIP_TOKENIZER = "xlm-roberta-large"
VAE_FILE = "Wan2.1_VAE.pth"
ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
             "F8_E5M2": "float8_e5m2", "F64": "float64", "I64": "int64", "I32": "int32", "I16": "int16",
             "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # safetensors' names -> torch's




def _need(path: Path, what: str, folder: bool = False) -> Path:
    if not (path.is_dir() if folder else path.is_file()):
        wrong = "a file, not a folder" if folder else "a folder, not a file"
        raise CheckpointError(f"{path}: {wrong if path.exists() else 'missing'} ({what}); "
                              f"point --ckpt_dir at a complete Wan2.1 checkpoint or write a test one with "
                              f"`flf2v-make-tiny DIR`")
    return path


def read_dit_config(ckpt_dir: str | os.PathLike, base: DiTConfig | None = None) -> DiTConfig:
    """The DiT config: the official config.json over `base`; another layout's is `base` or, without one, its
    preset's (matched by the weights' shapes)."""
    if detect(ckpt_dir).kind != OFFICIAL:
        return base if base is not None else preset_for(ckpt_dir).dit
    path = _need(Path(ckpt_dir) / DIT_CONFIG, "DiT config")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is damaged: download it again") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}; the file is damaged: "
                              f"download it again")
    try:
        return DiTConfig.from_json_dict(raw, base)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}; the file is damaged or edited: download it again") from None


def preset_for(ckpt_dir: str | os.PathLike) -> Preset:
    """The preset whose DiT matches the checkpoint's config.json (real 14B or a generated test one); in
    another layout, the one its DiT weights' shapes match."""
    layout = detect(ckpt_dir)
    if layout.kind != OFFICIAL:
        return _preset_from_shapes(layout)
    raw = read_dit_config(ckpt_dir)
    for p in PRESETS.values():
        d = p.dit
        if (d.model_type, d.dim, d.num_layers, d.num_heads, d.ffn_dim, d.text_dim, d.clip_dim) == (
                raw.model_type, raw.dim, raw.num_layers, raw.num_heads, raw.ffn_dim, raw.text_dim, raw.clip_dim):
            return p
    raise CheckpointError(f"{Path(ckpt_dir) / DIT_CONFIG}: no preset has dim={raw.dim}, "
                          f"num_layers={raw.num_layers}, model_type={raw.model_type!r}; known presets: "
                          f"{', '.join(PRESETS)}")


def _preset_from_shapes(layout: Layout) -> Preset:
    """The preset whose DiT has the shapes of this layout's DiT file: the model type from the keys (FLF2V's
    img_emb.emb_pos, I2V's k_img), widths and depth from the shapes, heads from a diffusers config.json when
    there is one (ComfyUI's files have none: the first preset that fits, 128-wide heads for the 14B)."""
    part = layout.parts["dit"]
    src = safetensors_source(part.files, part.prefix)
    rename = (lambda k: k) if part.naming == "official" else dit_key_to_diffusers

    def shape(key):
        return tuple(src[rename(key)].shape()) if rename(key) in src else None

    if shape("patch_embedding.weight") is None:
        raise CheckpointError(f"{part.origin}: no patch_embedding.weight: not a Wan2.1 DiT; use the FLF2V-14B or "
                              f"I2V-14B checkpoint")
    kind = "flf2v" if shape("img_emb.emb_pos") else "i2v" if shape("blocks.0.cross_attn.k_img.weight") else "t2v"
    dim, in_dim = shape("patch_embedding.weight")[:2]
    sig = dict(model_type=kind, dim=dim, in_dim=in_dim, num_layers=len({k.split(".")[1] for k in src if
                                                                        k.startswith("blocks.")}),
               ffn_dim=shape("blocks.0.ffn.0.weight")[0], text_dim=shape("text_embedding.0.weight")[1],
               clip_dim=(shape("img_emb.proj.0.weight") or (0,))[0])
    if layout.dit_config is not None and layout.dit_config.exists():
        sig["num_heads"] = json.loads(layout.dit_config.read_text()).get("num_attention_heads")
    for p in PRESETS.values():
        if all(getattr(p.dit, k) == v for k, v in sig.items() if v is not None):
            return p
    raise CheckpointError(f"{part.origin}: a Wan2.1 {kind.upper()} DiT of width {dim} with {sig['num_layers']} "
                          f"blocks; flf2v runs the FLF2V-14B and I2V-14B models: point it at one of those")


# ---------------------------------------------------------------------------------------------------
# tensor sources: name -> loader, so each tensor is read (and cast) only when it is assigned


def dit_tensor_source(ckpt_dir: str | os.PathLike) -> dict[str, Callable[[], torch.Tensor]]:
    """Lazy getters for every DiT tensor of an official sharded (index.json) or single-file safetensors DiT."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / DIT_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            listed = set(weight_map.values())
            if not listed or not all(isinstance(n, str) for n in listed):
                raise TypeError("no shard file names")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e!r}); the file is damaged: "
                                  f"download it again") from None
        if (ckpt_dir / DIT_SINGLE).exists() and DIT_SINGLE not in listed:  # which one is current?
            raise CheckpointError(f"{ckpt_dir}: holds two DiTs, {DIT_SINGLE} and the shards of {DIT_INDEX}; keep "
                                  f"one (move the other out of the folder)")
    elif (ckpt_dir / DIT_SINGLE).exists():
        weight_map = None
    else:
        raise CheckpointError(f"{index}: missing (DiT weights); point --ckpt_dir at a complete Wan2.1 "
                              f"checkpoint or write a test one with `flf2v-make-tiny DIR`")
    shards = sorted(set(weight_map.values())) if weight_map else [DIT_SINGLE]
    for name in shards:
        if weight_map is not None and not (ckpt_dir / name).exists():
            raise CheckpointError(f"{index}: shard {name} is listed but missing from {ckpt_dir}; re-download it")
    source = safetensors_source([ckpt_dir / n for n in shards])
    for key, name in (weight_map or {}).items():
        if key not in source or source[key].file != ckpt_dir / name:
            raise CheckpointError(f"{ckpt_dir / name}: index lists {key!r} but the shard does not hold it")
    return source


def safetensors_source(paths, prefix: str = "") -> dict[str, Callable[[], torch.Tensor]]:
    """Lazy getters for every tensor of the safetensors files `paths` (keys under `prefix`, stripped); each
    getter also reads row ranges (`.rows(start, stop)`, for sharded loading) and knows its `.file`."""
    source = {}
    for path in map(Path, paths):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e}); re-download it") from None
        for key in handle.keys():
            if key.startswith(prefix):
                source[key[len(prefix):]] = _safetensors_getter(handle, key, path)
    return source


def _safetensors_getter(handle, key: str, path: Path) -> Callable[[], torch.Tensor]:
    def read(how):
        try:
            return how()
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read {key!r} ({e}); the file is damaged") from None

    def get() -> torch.Tensor:
        return read(lambda: handle.get_tensor(key))

    def rows(start: int, stop: int) -> torch.Tensor:  # only these rows leave the file (sharded loading)
        return read(lambda: handle.get_slice(key)[start:stop])
    get.rows, get.file = rows, path
    get.shape = lambda: read(lambda: handle.get_slice(key).get_shape())
    get.dtype = lambda: ST_DTYPES.get(d := read(lambda: handle.get_slice(key).get_dtype()), d)
    return get


def pth_tensor_source(path: str | os.PathLike, prefix: str = "") -> dict[str, Callable[[], torch.Tensor]]:
    """Lazy getters for a `.pth` state dict, memory-mapped; keys under `prefix` with it stripped."""
    path = _need(Path(path), "weights")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, zipfile.BadZipFile) as e:
        # zip/pickle damage and truncation surface as RuntimeError from torch.load, or as OSError from its mmap
        why = str(e).splitlines()[0].split(". ")[0]  # torch appends paragraphs of advice to miniz's reason
        raise CheckpointError(f"{path}: unreadable checkpoint ({why}); re-download it") from None
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
        _check_shape(key, tuple(t.shape), tuple(ref.shape), origin)
        _check_dtype(key, t.dtype, ref.dtype, origin)
        getter = id(source[key])  # alive in `source` all along: a stable identity, unlike id(t)
        if getter not in converted:
            dt = stored_dtype(key, ref.dtype, dtype) if t.is_floating_point() else t.dtype
            converted[getter] = t.to(device, dt)
        loaded[key] = converted[getter]
    model.load_state_dict(loaded, strict=True, assign=True)
    return model.eval().requires_grad_(False)


COMPONENTS = ("dit", "t5", "clip", "vae")


def build_meta(ckpt_dir, component: str, preset: Preset, **kw) -> torch.nn.Module:
    """The network of `component` on the meta device (its fixed tables are built real on the CPU)."""
    if kw and component != "dit":
        raise ValueError(f"{sorted(kw)} apply to the DiT only, not to {component!r}")
    return _meta(component, _config(ckpt_dir, component, preset), **kw)


def _config(ckpt_dir, component: str, preset: Preset):
    return read_dit_config(ckpt_dir, preset.dit) if component == "dit" else getattr(preset, component)


def _meta(component: str, cfg, **kw) -> torch.nn.Module:
    from .clip import CLIPVisual
    from .dit import WanDiT
    from .t5 import UMT5Encoder
    from .vae import WanVAE
    with torch.device("meta"):
        return {"dit": WanDiT, "t5": UMT5Encoder, "clip": CLIPVisual, "vae": WanVAE}[component](cfg, **kw)


@functools.lru_cache(maxsize=None)  # configs are frozen: a process checking many checkpoints builds each once
def _meta_shapes(component: str, cfg) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _meta(component, cfg).state_dict().items()}


def tensor_source(ckpt_dir, component: str, preset: Preset | None = None
                  ) -> tuple[dict[str, Callable[[], torch.Tensor]], str, Callable]:
    """(lazy tensors keyed as the network names them, the file they come from, keys to skip). `preset`: the
    networks the files hold (default: found from the checkpoint)."""
    d = Path(ckpt_dir)
    layout = detect(d)
    if layout.kind != OFFICIAL:
        return _renamed_source(layout, component, preset or preset_for(d))
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


def _renamed_source(layout: Layout, component: str, preset: Preset):
    """A diffusers or ComfyUI network's tensors under the official keys (models/renamed.py)."""
    from .renamed import renamed_source
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; one of {COMPONENTS}")
    keys = list(_meta_shapes(component, _config(layout.root, component, preset)))
    part = layout.parts[component]
    files = safetensors_source(part.files, part.prefix)
    layers = {"clip": preset.clip.num_layers}.get(component, 0)
    source = renamed_source(part, component, keys, files, layers, preset.vae.num_res_blocks, CheckpointError)
    return source, part.origin, lambda k: False


def check_files(ckpt_dir, preset: Preset | None = None) -> None:
    """Every network's file against its model, before any of them loads: the key sets, and the shapes the files'
    headers give (safetensors, memory-mapped .pth), so a wrong or incomplete file is refused in one line, not
    after the networks loaded before it (the 14B DiT: minutes, 33 GB)."""
    preset = preset or preset_for(ckpt_dir)
    official = detect(ckpt_dir).kind == OFFICIAL
    for component in COMPONENTS:
        meta = _meta(component, _config(ckpt_dir, component, preset)).state_dict()
        expected = {k: tuple(v.shape) for k, v in meta.items()}
        source, origin, ignore = tensor_source(ckpt_dir, component, preset)
        try:
            check_keys(expected, source, origin, ignore)
        except CheckpointError as e:  # the official DiT is built from config.json: the two may disagree
            hint = f" (config.json describes an {preset.dit.model_type.upper()} DiT)" if official and \
                component == "dit" else ""
            raise CheckpointError(f"{e}{hint}") from None
        for key, want in expected.items():
            get = source[key]
            if hasattr(get, "shape") or official:  # .pth getters hand out memory-mapped tensors, unread
                _check_shape(key, tuple(get.shape() if hasattr(get, "shape") else get().shape), want, origin)
                _check_dtype(key, get.dtype() if hasattr(get, "dtype") else get().dtype, meta[key].dtype, origin)


def _check_shape(key: str, shape: tuple, want: tuple, origin: str) -> None:
    if shape != want:
        raise CheckpointError(f"{origin}: {key!r} has shape {shape}, the model needs {want}; the checkpoint does "
                              f"not match its config")


def _check_dtype(key: str, dtype, want: torch.dtype, origin: str) -> None:
    """A weight stored as integers (or a dtype torch has no name for): a traceback from load_state_dict before,
    and engines built from it without a word."""
    dtype = getattr(torch, dtype, dtype) if isinstance(dtype, str) else dtype  # a safetensors header's: a name
    if want.is_floating_point and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise CheckpointError(f"{origin}: {key!r} is stored as {dtype}, not as floating point; the file is damaged "
                              f"or not this model: download it again")


def load(ckpt_dir, component: str, dtype=torch.float32, preset: Preset | None = None, **kw) -> torch.nn.Module:
    """`component` ("dit", "t5", "clip" or "vae") of an official checkpoint, weights in `dtype` (a DiT with
    LoRAs merged in: models/lora.load_dit)."""
    preset = preset or preset_for(ckpt_dir)
    model = build_meta(ckpt_dir, component, preset, **kw)
    source, origin, ignore = tensor_source(ckpt_dir, component, preset)
    return fill(model, as_quantized(model, source), dtype, origin, ignore)


def as_quantized(model: torch.nn.Module, source: dict) -> dict:
    """`source` as the tensors of `model`: an FP8 DiT (quant="fp8") gets its FP8 weights and scales."""
    from .dit import WanDiT
    from .quant import block_linear_names, fp8_source
    if isinstance(model, WanDiT) and model.quant == "fp8":
        return fp8_source(source, block_linear_names(model))
    return source


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


def tokenizer_folder(ckpt_dir) -> Path:
    """The umT5 tokenizer's folder of a checkpoint; CheckpointError naming the fix when there is none."""
    layout = detect(ckpt_dir)
    if layout.tokenizer is None:  # a folder of links to files given one by one names no folder the user typed
        given = Path(ckpt_dir).resolve().parent == cache_folder().resolve()
        raise CheckpointError(f"{'the files of --dit/--t5/--clip/--vae' if given else f'{ckpt_dir}: the ComfyUI files'}"
                              f" have no umT5 tokenizer beside them (ComfyUI keeps it in its own code); pass "
                              f"--tokenizer DIR, or put google/umt5-xxl's tokenizer files in a tokenizer/ folder "
                              f"beside them")
    return _need(layout.tokenizer, "umT5 tokenizer folder", folder=True)


def load_tokenizer(ckpt_dir, preset: Preset | None = None):
    """The checkpoint's umT5 tokenizer; CheckpointError (one line) for a folder it cannot be loaded from.
    Cached: the CLI loads it among its checks, before any weights, and the pipeline gets the same one."""
    preset = preset or preset_for(ckpt_dir)
    return _tokenizer(tokenizer_folder(ckpt_dir).resolve(), preset.t5.text_len)


@functools.lru_cache(maxsize=4)
def _tokenizer(folder: Path, text_len: int):
    from .tokenizer import T5Tokenizer
    try:
        return T5Tokenizer(folder, text_len)
    except (RuntimeError, OSError) as e:
        why = str(e.__cause__ or e).strip().splitlines()[0][:200]
        raise CheckpointError(f"{folder}: no usable umT5 tokenizer there ({why}); give the folder of "
                              f"google/umt5-xxl's tokenizer files (tokenizer.json or spiece.model, with "
                              f"tokenizer_config.json)") from None


def weight_files(ckpt_dir: str | os.PathLike) -> Iterable[Path]:
    """Every weight file of a checkpoint (for fingerprints and size accounting)."""
    d = Path(ckpt_dir)
    yield from sorted(d.glob("diffusion_pytorch_model*.safetensors"))
    for name in (T5_FILE, CLIP_FILE, VAE_FILE):
        if (d / name).exists():
            yield d / name
