"""LoRAs for the Wan2.1 DiT, merged into the weights while the checkpoint streams in.

A LoRA file (safetensors only: a pickle can run code) is checked against the DiT's shapes before any
weight is loaded, so one made for another model fails in one line instead of being half applied.
`merged_source` wraps the checkpoint's getters: a changed weight becomes W + sum(scale * delta) in fp32
when `checkpoint.fill` asks for it, one weight at a time, then is cast to the run dtype like the rest.
Names read: official (optionally under `diffusion_model.`), diffusers/PEFT (`transformer.`), kohya/musubi
(`lora_unet_`); tensors lora_A/B or lora_down/up (+ .alpha), .diff, .diff_b, .diff_m (LightX2V's
modulation delta) and PEFT's lora_B.bias.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open

from . import checkpoint as ck

# kohya, ComfyUI (its Wan key map also reads LyCORIS' "lycoris_"), diffusers, PEFT; LightX2V also strips
# "model." and "unet." (its lora_loader.py)
PREFIXES = ("lora_unet_", "lycoris_", "diffusion_model.", "transformer.", "base_model.model.", "model.", "unet.")
# suffix -> (kind, leaf of the DiT tensor it changes)
SUFFIXES = {".lora_A.weight": ("down", "weight"), ".lora_down.weight": ("down", "weight"),
            ".lora_B.weight": ("up", "weight"), ".lora_up.weight": ("up", "weight"),
            ".alpha": ("alpha", "weight"), ".diff": ("full", "weight"), ".diff_b": ("full", "bias"),
            ".lora_B.bias": ("peft_bias", "bias"), ".diff_m": ("full", "modulation")}
PICKLES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


class LoRAError(ValueError):
    """A LoRA file or argument that cannot be applied; the message is one line naming the fix."""


@dataclass(frozen=True)
class LoRA:
    path: Path
    fingerprint: str
    keys: tuple[str, ...]
    # official key -> ((tensor names, multiplier), ...): one name is a full delta, two are (down, up)
    _parts: dict = field(repr=False, compare=False, default_factory=dict)
    _shapes: dict = field(repr=False, compare=False, default_factory=dict)

    def delta(self, key: str) -> torch.Tensor:
        """The fp32 change this LoRA makes to `key` at scale 1 (alpha/rank applied)."""
        total = torch.zeros(self._shapes[key])  # KeyError for a key the LoRA leaves alone
        with _open(self.path) as f:
            for names, mult in self._parts[key]:
                try:
                    t = [f.get_tensor(n).float() for n in names]
                except (SafetensorError, OSError) as e:
                    raise LoRAError(f"{self.path}: cannot read {names[0]!r} ({_line(e)}); the file is damaged "
                                    f"or changed since it was read") from None
                # (down, up) flattened, so that conv weights (patch_embedding) take the linear formula
                d = t[0] if len(t) == 1 else t[1].flatten(1) @ t[0].flatten(1)
                total += d.reshape(total.shape) * mult
        return total


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _finite(scale, where: str) -> float:
    try:
        # within float32: the merge multiplies fp32 deltas by it (1e39 was a traceback after the DiT loaded)
        if math.isfinite(value := float(scale)) and abs(value) <= torch.finfo(torch.float32).max:
            return value
    except (TypeError, ValueError):
        pass
    raise LoRAError(f"LoRA scale {scale!r} in {where!r} is not a finite number within float32's range; write "
                    f"PATH[:SCALE], e.g. style.safetensors:0.8")


def parse_lora_arg(text: str) -> tuple[str, float]:
    """"PATH[:SCALE]" -> (path, scale), scale 1.0 by default. Paths may hold ':' (C:\\, URLs of mounts):
    only a tail that reads as a number is a scale, unless it is clearly meant as one (x.safetensors:abc)."""
    text = os.fspath(text)
    head, sep, tail = text.rpartition(":")
    if sep and head and not Path(text).is_file():
        try:
            scale = float(tail)
        except ValueError:
            scale = None
        if scale is not None:
            return head, _finite(scale, text)
        if Path(head).is_file() or head.lower().endswith((".safetensors", ".sft") + PICKLES):
            _finite(tail, text)  # raises: the tail was meant as a scale
    if not text:
        raise LoRAError("empty LoRA path; write PATH[:SCALE], e.g. style.safetensors:0.8")
    return text, 1.0


def _open(path: Path):
    """safe_open, with a pickle or a damaged file refused in one line."""
    if path.is_dir():
        raise LoRAError(f"{path}: a folder, not a LoRA file; pass the .safetensors file in it")
    if not path.is_file():
        raise LoRAError(f"{path}: no such LoRA file; give the path of an existing .safetensors LoRA as PATH[:SCALE]")
    if path.suffix.lower() in PICKLES:
        raise LoRAError(f"{path}: refused: {path.suffix} files are pickles that can run code; "
                        f"use the .safetensors version of this LoRA")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic.startswith((b"PK\x03\x04", b"\x80\x02\x8a\x0a")):  # torch.save: zip, or legacy pickle
            raise LoRAError(f"{path}: refused: the file is a pickle (torch.save), which can run code; "
                            f"use the .safetensors version of this LoRA") from None
        if path.suffix.lower() != ".safetensors":  # a photo given as the LoRA was told to download it again
            raise LoRAError(f"{path}: not a safetensors file ({_line(e)}); --lora takes a LoRA's .safetensors "
                            f"file") from None
        raise LoRAError(f"{path}: unreadable safetensors file ({_line(e)}); the file is damaged: "
                        f"download it again") from None


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()[:32]


def _aliases(shapes: Iterable[str]) -> dict[str, str]:
    """Every spelling of a DiT tensor name a LoRA may use -> the official key: the official name, the
    diffusers name (inverting models/keymaps.py's map) and kohya's of either (module dots as underscores)."""
    from .keymaps import dit_key_to_diffusers
    table = {}
    for key in shapes:
        for name in (key, dit_key_to_diffusers(key)):
            module, _, leaf = name.rpartition(".")
            for alias in (name, f"{module.replace('.', '_')}.{leaf}"):
                table.setdefault(alias, key)
    return table


def _peft_alpha(path: Path, metadata: dict | None) -> float | None:
    """lora_alpha of a diffusers-saved PEFT LoRA (its `lora_adapter_metadata`): PEFT scales by alpha/rank."""
    try:
        meta = json.loads((metadata or {}).get("lora_adapter_metadata") or "{}")
        meta = {k.removeprefix("transformer."): v for k, v in meta.items()}
    except (json.JSONDecodeError, AttributeError) as e:
        raise LoRAError(f"{path}: unreadable lora_adapter_metadata ({_line(e)}); the file is damaged") from None
    if any(meta.get(k) for k in ("alpha_pattern", "use_dora", "use_rslora")):
        raise LoRAError(f"{path}: PEFT's alpha_pattern, DoRA and rsLoRA are not supported; merge the LoRA with "
                        f"PEFT and save plain lora_A/lora_B tensors")
    return None if meta.get("lora_alpha") is None else float(meta["lora_alpha"])


def _groups(path: Path, names: list[str], table: dict[str, str]) -> dict[str, dict[str, str]]:
    """{official module (or, if none, the name without its format prefix): {kind: tensor name}}."""
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        bare = next((name[len(p):] for p in PREFIXES if name.startswith(p)), name)
        suffix = next((s for s in SUFFIXES if bare.endswith(s)), None)
        if suffix is None:
            raise LoRAError(f"{path}: LoRA tensor {name!r} is of a kind this loader does not read (only "
                            f"lora_A/B, lora_down/up, .alpha, .diff, .diff_b, .diff_m; no LoHa, LoKr or DoRA); "
                            f"use a plain LoRA")
        kind, leaf = SUFFIXES[suffix]
        module = bare[:-len(suffix)]
        group = groups.setdefault(table.get(f"{module}.{leaf}", f"{module}.").rpartition(".")[0], {})
        kind = leaf if kind == "full" else kind
        if kind in group:  # two spellings of one tensor: using either alone would be a silent choice
            raise LoRAError(f"{path}: {name!r} and {group[kind]!r} are the same LoRA tensor; keep one of them")
        group[kind] = name
    return groups


def _entries(path: Path, f, shapes: dict, peft_alpha: float | None):
    """[(tensor name, official key or None, parts, delta shape)] of every change the file makes."""
    table = _aliases(shapes)
    out = []
    for module, kinds in _groups(path, list(f.keys()), table).items():
        weight = table.get(f"{module}.weight")
        mult = 1.0
        if "down" in kinds or "up" in kinds or "alpha" in kinds:
            down, up = kinds.get("down"), kinds.get("up")
            if down is None or up is None:
                given = down or up or kinds["alpha"]
                raise LoRAError(f"{path}: {given!r} has no matching lora_{'up' if down else 'down'}/"
                                f"lora_{'B' if down else 'A'} tensor; the file is incomplete")
            a, b = f.get_slice(down).get_shape(), f.get_slice(up).get_shape()
            if len(a) < 2 or len(b) < 2 or a[0] != b[1] or math.prod(b[2:]) != 1:
                raise LoRAError(f"{path}: {down!r} {tuple(a)} and {up!r} {tuple(b)} are not a LoRA pair; "
                                f"the file is damaged")
            alpha = f.get_tensor(kinds["alpha"]) if "alpha" in kinds else peft_alpha
            if isinstance(alpha, torch.Tensor) and (alpha.numel() != 1 or alpha.dtype == torch.bool
                                                    or alpha.is_complex() or not math.isfinite(alpha := alpha.item())):
                raise LoRAError(f"{path}: {kinds['alpha']!r} is not one finite number; the file is damaged")
            mult = 1.0 if alpha is None else alpha / a[0]  # no alpha: B @ A as it is
            out.append((up, weight, ((down, up), mult), (b[0], math.prod(a[1:]))))
        # full deltas; PEFT scales lora_B's bias like the pair's weight
        for kind, leaf, m in (("weight", "weight", 1.0), ("bias", "bias", 1.0), ("modulation", "modulation", 1.0),
                              ("peft_bias", "bias", mult)):
            if kind in kinds:
                name = kinds[kind]
                out.append((name, table.get(f"{module}.{leaf}"), ((name,), m), tuple(f.get_slice(name).get_shape())))
    return out


def _fits(delta: tuple, shape: tuple) -> bool:
    """A low-rank pair's (out, in) fits a conv weight flattened, a full delta only the exact shape."""
    return tuple(delta) == tuple(shape) or (len(delta) == 2 and delta == (shape[0], math.prod(shape[1:])))


def _check(path: Path, entries: list, shapes: dict) -> None:
    """One-line refusal of a LoRA that does not fit: another model size, a foreign key, a wrong shape."""
    known = [e for e in entries if e[1] is not None]
    bad = [e for e in known if not _fits(e[3], shapes[e[1]])]
    dim = shapes["patch_embedding.weight"][0]
    # the width it was made for: its out size where this model's is `dim` (attention, ffn.2, norms...)
    seen = Counter(d[0] for _, key, _, d in bad if shapes[key][0] == dim).most_common(1)
    width = seen[0][0] if seen else bad[0][3][0] if bad else dim
    if known and len(bad) == len(known) and width != dim:
        raise LoRAError(f"{path}: made for another model size (dim {width}, this checkpoint has dim {dim}); "
                        f"use a LoRA made for this model")
    if unknown := next((name for name, key, _, _ in entries if key is None), None):
        raise LoRAError(f"{path}: LoRA tensor {unknown!r} names no weight of this Wan2.1 DiT (a LoRA for another "
                        f"model, e.g. Wan2.2, T2V-1.3B or a text encoder); use one made for this checkpoint")
    if bad:
        name, key, _, d = bad[0]
        raise LoRAError(f"{path}: {name!r} changes {key!r} by a delta of shape {tuple(d)}, the weight has shape "
                        f"{tuple(shapes[key])}; the LoRA does not fit this checkpoint")


def read_lora(path, shapes: dict[str, tuple[int, ...]]) -> LoRA:
    """The LoRA at `path`, checked against a DiT with these official key -> shape (its values finite)."""
    path = Path(path)
    with _open(path) as f:
        if not list(f.keys()):
            raise LoRAError(f"{path}: holds no tensors; the file is not a LoRA")
        entries = _entries(path, f, shapes, _peft_alpha(path, f.metadata()))
        for name in f.keys():  # read once already for the fingerprint; a NaN would surface only as NaN latents
            try:
                t = f.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise LoRAError(f"{path}: cannot read {name!r} ({_line(e)}); the file is damaged") from None
            if not (t.is_floating_point() or name.endswith(".alpha")):  # kohya may store alpha as an int
                raise LoRAError(f"{path}: {name!r} is stored as {t.dtype}, not as floating point; the file is not a "
                                f"LoRA, or is damaged")
            # fp8 LoRAs (shared for ComfyUI) are upcast as their deltas are: torch has no isfinite for float8
            finite = bool(torch.isfinite(t.float()).all())
            if not finite:
                raise LoRAError(f"{path}: {name!r} holds NaN or Inf values; the file is damaged, re-download it")
    _check(path, entries, shapes)
    parts: dict[str, tuple] = {}
    for _, key, part, _ in entries:
        parts[key] = parts.get(key, ()) + (part,)
    return LoRA(path, _fingerprint(path), tuple(sorted(parts)), parts, {k: tuple(shapes[k]) for k in parts})


def merged_source(source: dict[str, Callable[[], torch.Tensor]],
                  loras: list[tuple[LoRA, float]]) -> dict[str, Callable[[], torch.Tensor]]:
    """`source` with the getters of changed keys returning W + sum(scale * delta) in fp32, computed only
    when called (one weight at a time). Scale-0 LoRAs are dropped, so they change nothing, bit for bit."""
    terms: dict[str, list[tuple[LoRA, float]]] = {}
    for lora, scale in loras:
        scale = _finite(scale, str(lora.path))
        if scale == 0:
            continue
        for key in lora.keys:
            if key not in source:
                raise LoRAError(f"{lora.path}: changes {key!r}, which this checkpoint does not hold")
            terms.setdefault(key, []).append((lora, scale))

    def getter(key: str, get: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def merged() -> torch.Tensor:
            w = get().to(torch.float32, copy=True)  # a copy: an eager source hands out its own tensor
            for lora, scale in terms[key]:
                w.add_(lora.delta(key), alpha=scale)
            if not torch.isfinite(w).all():  # found as a NaN video after the whole run, or in a build's engines
                given = ", ".join(f"{lora.path.name}:{scale:g}" for lora, scale in terms[key])
                raise LoRAError(f"{key!r} overflows with the LoRAs merged ({given}); lower their scales")
            return w
        return merged

    return {k: getter(k, g) if k in terms else g for k, g in source.items()}


def load_dit(ckpt_dir, dtype=torch.float32, preset=None, loras=(), layers: int | None = None,
             blocks_only: bool = False, **kw) -> torch.nn.Module:
    """checkpoint.load_dit with `loras` ([(LoRA, scale)]) merged into the weights as they stream in.
    `layers`: the DiT cut to its first `layers` blocks (a slice to measure at full width); `blocks_only`: the
    blocks' ModuleList alone (streamed AOTInductor packages hold the rest). What is left out is never read."""
    preset = preset or ck.preset_for(ckpt_dir)
    source, origin, ignore = ck.tensor_source(ckpt_dir, "dit", preset)
    model = ck.build_meta(ckpt_dir, "dit", preset, **kw)
    source = ck.as_quantized(model, merged_source(source, loras) if loras else source)
    if layers is not None:
        source = _cut(model, source, layers)
    if blocks_only:
        model = model.blocks
        source = {k.removeprefix("blocks."): g for k, g in source.items() if k.startswith("blocks.")}
    return ck.fill(model, source, dtype, origin, ignore)


def _cut(model: torch.nn.Module, source: dict, layers: int) -> dict:
    """`model` (meta) cut to its first `layers` blocks; `source` without the other blocks' tensors."""
    if not 0 < layers <= len(model.blocks):
        raise ValueError(f"layers={layers}: the DiT has {len(model.blocks)} blocks; give 1 to {len(model.blocks)}")
    model.blocks = model.blocks[:layers]
    model.cfg = replace(model.cfg, num_layers=layers)
    return {k: g for k, g in source.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < layers}


def _is_pair(s, number: bool = False) -> bool:
    """(path, scale); `number`: with a numeric scale (one pair given alone, not a list of two paths)."""
    return isinstance(s, (tuple, list)) and len(s) == 2 and isinstance(s[0], (str, os.PathLike)) and (
        not number or isinstance(s[1], (int, float)) and not isinstance(s[1], bool))


def load_loras(specs, ckpt_dir) -> list[tuple[LoRA, float]]:
    """[(LoRA, scale)] for `specs`: "PATH[:SCALE]" strings or (path, scale) pairs, checked against the DiT."""
    if not specs:
        return []
    if isinstance(specs, (str, os.PathLike)) or _is_pair(specs, number=True):  # one LoRA, not a list of them
        specs = [specs]
    try:
        specs = list(specs)  # a generator or a set of them too
    except TypeError:  # loras=5 was "'int' object is not iterable"
        raise LoRAError(f"loras={specs!r}: give \"PATH[:SCALE]\" or (path, scale), in a list for several") from None
    if bad := [s for s in specs if not isinstance(s, (str, os.PathLike)) and not _is_pair(s)]:
        raise LoRAError(f"LoRA {bad[0]!r}: give \"PATH[:SCALE]\" or (path, scale), in a list for several")
    pairs = [parse_lora_arg(s) if isinstance(s, (str, os.PathLike)) else (s[0], _finite(s[1], str(s[0])))
             for s in specs]
    shapes = ck.dit_shapes(ckpt_dir)
    return [(read_lora(path, shapes), scale) for path, scale in pairs]
