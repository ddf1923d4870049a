"""diffusers' AutoencoderKLWan as an independent reference for models/vae.py (tests only)."""
from __future__ import annotations

import re

from flf2v.models.config import VAEConfig

_TOP = {  # official module prefix -> diffusers module prefix
    "conv1.": "quant_conv.",
    "conv2.": "post_quant_conv.",
    "encoder.conv1.": "encoder.conv_in.",
    "decoder.conv1.": "decoder.conv_in.",
    "encoder.head.0.": "encoder.norm_out.",
    "encoder.head.2.": "encoder.conv_out.",
    "decoder.head.0.": "decoder.norm_out.",
    "decoder.head.2.": "decoder.conv_out.",
}
_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_RESBLOCK = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
             "shortcut.": "conv_shortcut."}


def _resblock(rest: str) -> str:
    for old, new in _RESBLOCK.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest  # Resample (resample.1.*, time_conv.*) and attention keys are named alike


def official_to_diffusers_key(key: str, num_res_blocks: int) -> str:
    for old, new in _TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = re.fullmatch(r"(encoder|decoder)\.middle\.(\d)\.(.+)", key)
    if m:
        part, i, rest = m.groups()
        return f"{part}.mid_block.{_MIDDLE[i]}.{_resblock(rest)}"
    m = re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", key)
    if m:  # diffusers keeps the encoder's flat list
        i, rest = m.groups()
        return f"encoder.down_blocks.{i}.{_resblock(rest)}"
    m = re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key)
    if m:  # flat list of (num_res_blocks + 1 residual blocks, upsample) per level -> up_blocks.{level}
        i, rest = m.groups()
        level, j = divmod(int(i), num_res_blocks + 2)
        if j == num_res_blocks + 1:
            return f"decoder.up_blocks.{level}.upsamplers.0.{rest}"
        return f"decoder.up_blocks.{level}.resnets.{j}.{_resblock(rest)}"
    raise KeyError(f"no diffusers name for official key {key!r}")


def official_to_diffusers(state_dict: dict, num_res_blocks: int) -> dict:
    return {official_to_diffusers_key(k, num_res_blocks): v for k, v in state_dict.items()}


def build_diffusers_vae(cfg: VAEConfig, official_state_dict: dict):
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan(base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                             num_res_blocks=cfg.num_res_blocks, attn_scales=[],
                             temperal_downsample=list(cfg.temperal_downsample),
                             latents_mean=list(cfg.mean), latents_std=list(cfg.std))
    model.load_state_dict(official_to_diffusers(official_state_dict, cfg.num_res_blocks), strict=True)
    return model.eval()
