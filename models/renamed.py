"""Tensor sources of the diffusers and ComfyUI layouts (models/layouts.py), renamed to the official keys.

Each official key of a network gets a lazy getter over the file's tensor(s) of its other name
(models/keymaps.py): a rename for the DiT, umT5 and VAE; for CLIP the fused qkv is the concatenation of
transformers' q, k and v, and the class / position embeddings regain their leading dims. Every key of the
file must be used or be one the official loader skips too (CLIP's last block and post-norm, the second name
of umT5's tied embedding): the missing and the unexpected are named in one line.

FP8 files. A float8 weight with a `<module>.scale_weight` beside it (ComfyUI's "scaled fp8" convention,
comfy/ops.py: weight = fp8 weight * scale_weight, one fp32 scalar per tensor) is read as that product in
fp32; a float8 weight without one (ComfyUI's `*_fp8_e4m3fn` DiT files) is its value. Either way
checkpoint.fill then casts it to the run's dtype, one tensor at a time.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from .keymaps import clip_key_to_transformers, dit_key_to_diffusers, t5_to_transformers, vae_key_to_diffusers
from .layouts import Part

SCALE_KEYS = re.compile(r".*\.(scale_weight|scale_input)$|^scaled_fp8$")  # ComfyUI's fp8 scales and marker


def file_names(component: str, naming: str, keys: list[str], num_res_blocks: int) -> dict[str, list[str]]:
    """Official key -> the file's names for it, in order of preference (the first one present is read)."""
    if naming == "official":
        return {k: [k] for k in keys}
    if component == "dit":
        return {k: [dit_key_to_diffusers(k)] for k in keys}
    if component == "vae":
        return {k: [vae_key_to_diffusers(k, num_res_blocks)] for k in keys}
    if component == "t5":  # the map renames tensors; fed names, it gives transformers name -> official key
        out: dict[str, list[str]] = {k: [] for k in keys}
        for name, key in t5_to_transformers({k: k for k in keys}).items():
            out[key].append(name)
        return out
    return {k: clip_key_to_transformers(k) for k in keys}


def _clip_value(key: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 3:  # fused qkv
        return torch.cat(parts, dim=0)
    if key == "cls_embedding":
        return parts[0].reshape(1, 1, -1)
    if key == "pos_embedding":
        return parts[0][None]
    return parts[0]


def _skipped(component: str, name: str, num_layers: int) -> bool:
    """File keys the official loader skips as well (models/clip.py ignored_keys) or that only say how the
    file is stored."""
    if SCALE_KEYS.fullmatch(name) or name.endswith("position_ids"):
        return True
    if component == "clip":
        return (name.startswith(("post_layernorm.", "visual_projection.")) or
                name.startswith(f"encoder.layers.{num_layers - 1}."))
    return False


def renamed_source(part: Part, component: str, keys: list[str], file_source: dict[str, Callable],
                   num_layers: int, num_res_blocks: int, error) -> dict[str, Callable[[], torch.Tensor]]:
    """Official key -> lazy getter, from `file_source` (the file's key -> getter, prefix stripped).
    `error(message)` makes the exception to raise."""
    names = file_names(component, part.naming, keys, num_res_blocks)
    source, used, missing = {}, set(), []
    for key, options in names.items():
        if component == "clip" and len(options) > 1:
            chosen = options if all(o in file_source for o in options) else []
        else:
            chosen = [next((o for o in options if o in file_source), None)] if options else []
            chosen = [c for c in chosen if c is not None]
        if not chosen:
            absent = [o for o in options if o not in file_source] or options
            missing.append(f"{part.prefix + absent[0]!r} (official {key!r})")
            continue
        used.update(options if component == "t5" else chosen)
        source[key] = _getter(key, [file_source[c] for c in chosen], [_scale(file_source, c) for c in chosen],
                              component)
    unexpected = sorted(part.prefix + n for n in file_source
                        if n not in used and not _skipped(component, n, num_layers))
    if missing:
        raise error(f"{part.origin}: missing key {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1
                    else "") + f"; the file is incomplete or not this model's {component}")
    if unexpected:
        raise error(f"{part.origin}: unexpected key {unexpected[0]!r}" + (f" (+{len(unexpected) - 1} more)"
                    if len(unexpected) > 1 else "") + f"; the file holds another model's {component}")
    return source


def _scale(file_source: dict, name: str):
    module, _, leaf = name.rpartition(".")
    return file_source.get(f"{module}.scale_weight") if leaf == "weight" else None


def _getter(key: str, reads: list[Callable], scales: list, component: str) -> Callable[[], torch.Tensor]:
    def value(read, scale):
        t = read()
        return t.float() * scale().float() if scale is not None else t

    if len(reads) == 1 and scales[0] is None and component != "clip":
        return reads[0]  # a plain rename keeps the file's getter (and its row reads for sharded loading)
    if component == "clip":
        def get():
            return _clip_value(key, [value(r, s) for r, s in zip(reads, scales)])
    else:
        def get():
            return value(reads[0], scales[0])
    if component != "clip":
        get.shape = reads[0].shape  # from the file's header: checked before any weight is read
    elif all(hasattr(r, "shape") for r in reads):
        get.shape = lambda: _clip_value(key, [torch.empty(r.shape(), device="meta") for r in reads]).shape
    return get
