"""diffusers' AutoencoderKLWan as an independent reference for models/vae.py (tests only)."""
from __future__ import annotations

from flf2v.models.config import VAEConfig
from flf2v.bench.diffusers_peer import vae_diffusers_config
from flf2v.models.keymaps import vae_to_diffusers


def build_diffusers_vae(cfg: VAEConfig, official_state_dict: dict):
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan(**vae_diffusers_config(cfg))
    model.load_state_dict(vae_to_diffusers(official_state_dict, cfg.num_res_blocks), strict=True)
    return model.eval()
