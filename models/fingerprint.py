"""What a checkpoint is, in any layout: its content fingerprint and a description (layout, stored dtypes).

The fingerprint hashes the DiT config as read and every network's tensors under their official keys (key, shape, and sampled values
as fp32: a tensor of up to 64k elements whole, a larger one's first and last rows), so the same weights
give the same fingerprint in the official, diffusers and ComfyUI layouts, and engines built from one serve
the others. Values, not bytes: bf16 weights stored as fp32 (exactly representable) hash alike; an fp16 or
fp8 file's rounded weights do not, and must not: engines built from them hold other numbers.
"""
from __future__ import annotations

import hashlib
import json

import torch

from . import checkpoint as ck
from .layouts import OFFICIAL, detect
from .renamed import SCALE_KEYS

WHOLE = 1 << 16  # elements: tensors up to this size are hashed whole


def _shape(get) -> tuple[int, ...]:
    return tuple(get.shape()) if hasattr(get, "shape") else tuple(get().shape)  # .pth: memory-mapped, unread


def _sample(get) -> list[torch.Tensor]:
    shape = _shape(get)
    big = torch.Size(shape).numel() > WHOLE and len(shape) > 1
    if big and hasattr(get, "rows"):
        return [get.rows(0, 1), get.rows(shape[0] - 1, shape[0])]  # only these rows leave the file
    t = get()
    return [t[:1], t[-1:]] if big else [t]


def content_fingerprint(ckpt_dir) -> str:
    # the DiT's config as read (official config.json, another layout's preset), not the file's bytes
    h = hashlib.sha256(json.dumps(ck.read_dit_config(ckpt_dir).to_json_dict(), sort_keys=True).encode())
    for component in ck.COMPONENTS:
        source, _, ignore = ck.tensor_source(ckpt_dir, component)
        for key in sorted(k for k in source if not ignore(k)):
            h.update(f"{component}:{key}:{_shape(source[key])}\n".encode())
            for t in _sample(source[key]):
                h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def stored_dtypes(ckpt_dir) -> dict[str, str]:
    """network -> the dtype most of its weights are stored in, then the others ("float8_e4m3fn+float32")."""
    layout = detect(ckpt_dir)
    out = {}
    for component in ck.COMPONENTS:
        if layout.kind == OFFICIAL:
            source, _, ignore = ck.tensor_source(ckpt_dir, component)
        else:  # the file's own tensors (fp8 weights, not their scaled fp32 values)
            part = layout.parts[component]
            source, ignore = ck.safetensors_source(part.files, part.prefix), SCALE_KEYS.fullmatch
        counts: dict[str, int] = {}
        for key, get in source.items():
            if not ignore(key):
                dtype = get.dtype() if hasattr(get, "dtype") else str(get().dtype).removeprefix("torch.")
                counts[dtype] = counts.get(dtype, 0) + torch.Size(_shape(get)).numel()
        out[component] = "+".join(sorted(counts, key=counts.get, reverse=True))
    return out


def describe(ckpt_dir) -> dict:
    """{"layout": official | diffusers | comfyui, "dtypes": {network: stored dtype}}: for logs and manifests."""
    return {"layout": detect(ckpt_dir).kind, "dtypes": stored_dtypes(ckpt_dir)}
