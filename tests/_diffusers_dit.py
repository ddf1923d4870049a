"""diffusers' WanTransformer3DModel as an independent reference for models/dit.py (tests only)."""
from __future__ import annotations

import re

import torch

from flf2v.models.config import DiTConfig

_TOP = {  # official module prefix -> diffusers module prefix
    "text_embedding.0.": "condition_embedder.text_embedder.linear_1.",
    "text_embedding.2.": "condition_embedder.text_embedder.linear_2.",
    "time_embedding.0.": "condition_embedder.time_embedder.linear_1.",
    "time_embedding.2.": "condition_embedder.time_embedder.linear_2.",
    "time_projection.1.": "condition_embedder.time_proj.",
    "img_emb.proj.0.": "condition_embedder.image_embedder.norm1.",
    "img_emb.proj.1.": "condition_embedder.image_embedder.ff.net.0.proj.",
    "img_emb.proj.3.": "condition_embedder.image_embedder.ff.net.2.",
    "img_emb.proj.4.": "condition_embedder.image_embedder.norm2.",
    "head.head.": "proj_out.",
    "patch_embedding.": "patch_embedding.",
}
_WHOLE = {"img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed", "head.modulation": "scale_shift_table"}
_BLOCK = {  # inside blocks.{i}.
    "modulation": "scale_shift_table",
    "norm3.": "norm2.",  # diffusers swaps the names: its norm2 is the affine cross-attention norm
    "ffn.0.": "ffn.net.0.proj.",
    "ffn.2.": "ffn.net.2.",
}
_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "k_img": "add_k_proj", "v_img": "add_v_proj",
         "norm_q": "norm_q", "norm_k": "norm_k", "norm_k_img": "norm_added_k"}


def official_to_diffusers_key(key: str) -> str:
    if key in _WHOLE:
        return _WHOLE[key]
    for old, new in _TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = re.fullmatch(r"blocks\.(\d+)\.(self_attn|cross_attn)\.(\w+)\.(weight|bias)", key)
    if m:
        i, which, layer, param = m.groups()
        return f"blocks.{i}.{'attn1' if which == 'self_attn' else 'attn2'}.{_ATTN[layer]}.{param}"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m:
        i, rest = m.groups()
        for old, new in _BLOCK.items():
            if rest.startswith(old):
                return f"blocks.{i}.{new}{rest[len(old):]}"
    raise KeyError(f"no diffusers name for official key {key!r}")


def official_to_diffusers(state_dict: dict) -> dict:
    return {official_to_diffusers_key(k): v for k, v in state_dict.items()}


def diffusers_config(cfg: DiTConfig) -> dict:
    """WanTransformer3DModel kwargs of the official FLF2V/I2V model with cfg's sizes."""
    return dict(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=cfg.eps, image_dim=cfg.clip_dim, added_kv_proj_dim=cfg.dim,
                rope_max_seq_len=cfg.rope_max_pos,
                pos_embed_seq_len=cfg.clip_tokens if cfg.model_type == "flf2v" else None)


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
