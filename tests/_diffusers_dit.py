"""diffusers' WanTransformer3DModel as an independent reference for models/dit.py (tests only)."""
from __future__ import annotations

import torch

from flf2v.models.config import DiTConfig
from flf2v.bench.diffusers_peer import dit_diffusers_config as diffusers_config  # noqa: F401
from flf2v.models.keymaps import dit_to_diffusers as official_to_diffusers


def build_diffusers_dit(cfg: DiTConfig, official_state_dict: dict):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**diffusers_config(cfg))
    model.load_state_dict(official_to_diffusers(official_state_dict), strict=True)
    return model.eval()


def diffusers_forward(model, cfg: DiTConfig, x, t, context, clip_fea, y) -> torch.Tensor:
    """Same inputs as WanDiT.forward; diffusers wants flf2v CLIP features per frame [2B, 257, C]."""
    if cfg.model_type == "flf2v":
        clip_fea = clip_fea.reshape(-1, cfg.clip_tokens // 2, cfg.clip_dim)
    out = model(torch.cat([x, y], dim=1), t, context, encoder_hidden_states_image=clip_fea, return_dict=False)
    return out[0]
