"""Official Wan2.1 checkpoint -> the diffusers / transformers classes, and the peer pipeline built from it.

Key maps from the official layout to diffusers' `WanTransformer3DModel` and `AutoencoderKLWan` and to
transformers' `UMT5EncoderModel` and `CLIPVisionModel`, used as independent references by the tests and to
build diffusers' `WanImageToVideoPipeline` on the very weights of an official-layout `--ckpt_dir`, the
peer the benchmark measures against. Tensors are renamed (T5's tied embedding shared, CLIP's fused qkv
split), never copied, and cast one at a time while loading.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from flf2v.models import checkpoint as ck
from flf2v.models.config import CLIPConfig, DiTConfig, Preset, T5Config, VAEConfig

# ---- DiT: WanModel -> WanTransformer3DModel ---------------------------------------------------------

_DIT_TOP = {  # official module prefix -> diffusers module prefix
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
# diffusers' own converter has no entry for the FLF2V `img_emb.emb_pos`.
_DIT_WHOLE = {"img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed", "head.modulation": "scale_shift_table"}
_DIT_BLOCK = {  # inside blocks.{i}.
    "modulation": "scale_shift_table",
    "norm3.": "norm2.",  # diffusers swaps the names: its norm2 is the affine cross-attention norm
    "ffn.0.": "ffn.net.0.proj.",
    "ffn.2.": "ffn.net.2.",
}
_DIT_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "k_img": "add_k_proj", "v_img": "add_v_proj",
             "norm_q": "norm_q", "norm_k": "norm_k", "norm_k_img": "norm_added_k"}


def dit_key_to_diffusers(key: str) -> str:
    if key in _DIT_WHOLE:
        return _DIT_WHOLE[key]
    for old, new in _DIT_TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = re.fullmatch(r"blocks\.(\d+)\.(self_attn|cross_attn)\.(\w+)\.(weight|bias)", key)
    if m:
        i, which, layer, param = m.groups()
        return f"blocks.{i}.{'attn1' if which == 'self_attn' else 'attn2'}.{_DIT_ATTN[layer]}.{param}"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m:
        i, rest = m.groups()
        for old, new in _DIT_BLOCK.items():
            if rest.startswith(old):
                return f"blocks.{i}.{new}{rest[len(old):]}"
    raise KeyError(f"no diffusers name for official DiT key {key!r}")


def dit_to_diffusers(state_dict: dict) -> dict:
    return {dit_key_to_diffusers(k): v for k, v in state_dict.items()}


def dit_diffusers_config(cfg: DiTConfig) -> dict:
    """WanTransformer3DModel kwargs of the official FLF2V/I2V model with cfg's sizes."""
    return dict(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=cfg.eps, image_dim=cfg.clip_dim, added_kv_proj_dim=cfg.dim,
                rope_max_seq_len=cfg.rope_max_pos,
                pos_embed_seq_len=cfg.clip_tokens if cfg.model_type == "flf2v" else None)


# ---- VAE: WanVAE -> AutoencoderKLWan ------------------------------------------------------------------

_VAE_TOP = {
    "conv1.": "quant_conv.",
    "conv2.": "post_quant_conv.",
    "encoder.conv1.": "encoder.conv_in.",
    "decoder.conv1.": "decoder.conv_in.",
    "encoder.head.0.": "encoder.norm_out.",
    "encoder.head.2.": "encoder.conv_out.",
    "decoder.head.0.": "decoder.norm_out.",
    "decoder.head.2.": "decoder.conv_out.",
}
_VAE_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_VAE_RESBLOCK = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
                 "shortcut.": "conv_shortcut."}


def _vae_resblock(rest: str) -> str:
    for old, new in _VAE_RESBLOCK.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest  # Resample (resample.1.*, time_conv.*) and attention keys are named alike


def vae_key_to_diffusers(key: str, num_res_blocks: int) -> str:
    for old, new in _VAE_TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = re.fullmatch(r"(encoder|decoder)\.middle\.(\d)\.(.+)", key)
    if m:
        part, i, rest = m.groups()
        return f"{part}.mid_block.{_VAE_MIDDLE[i]}.{_vae_resblock(rest)}"
    m = re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", key)
    if m:  # diffusers keeps the encoder's flat list
        i, rest = m.groups()
        return f"encoder.down_blocks.{i}.{_vae_resblock(rest)}"
    m = re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key)
    if m:  # flat list of (num_res_blocks + 1 residual blocks, upsample) per level -> up_blocks.{level}
        i, rest = m.groups()
        level, j = divmod(int(i), num_res_blocks + 2)
        if j == num_res_blocks + 1:
            return f"decoder.up_blocks.{level}.upsamplers.0.{rest}"
        return f"decoder.up_blocks.{level}.resnets.{j}.{_vae_resblock(rest)}"
    raise KeyError(f"no diffusers name for official VAE key {key!r}")


def vae_to_diffusers(state_dict: dict, num_res_blocks: int) -> dict:
    return {vae_key_to_diffusers(k, num_res_blocks): v for k, v in state_dict.items()}


def vae_diffusers_config(cfg: VAEConfig) -> dict:
    return dict(base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
                attn_scales=[], temperal_downsample=list(cfg.temperal_downsample), latents_mean=list(cfg.mean),
                latents_std=list(cfg.std))


# ---- umT5 encoder -> transformers UMT5EncoderModel ----------------------------------------------------

_T5_BLOCK = {"attn.q": "layer.0.SelfAttention.q", "attn.k": "layer.0.SelfAttention.k",
             "attn.v": "layer.0.SelfAttention.v", "attn.o": "layer.0.SelfAttention.o",
             "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
             "norm1": "layer.0.layer_norm", "norm2": "layer.1.layer_norm",
             "ffn.gate.0": "layer.1.DenseReluDense.wi_0", "ffn.fc1": "layer.1.DenseReluDense.wi_1",
             "ffn.fc2": "layer.1.DenseReluDense.wo"}


def t5_to_transformers(sd: dict) -> dict:
    """Official umT5 encoder keys -> UMT5EncoderModel keys (the embedding is tied: one tensor, two names)."""
    emb = sd["token_embedding.weight"]
    out = {"shared.weight": emb, "encoder.embed_tokens.weight": emb,
           "encoder.final_layer_norm.weight": sd["norm.weight"]}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            out[f"encoder.block.{i}.{_T5_BLOCK[rest.removesuffix('.weight')]}.weight"] = v
        elif k not in ("token_embedding.weight", "norm.weight"):
            raise KeyError(f"no transformers name for official umT5 key {k!r}")
    return out


def t5_transformers_config(cfg: T5Config, **kw):
    from transformers import UMT5Config

    return UMT5Config(vocab_size=cfg.vocab, d_model=cfg.dim, d_kv=cfg.head_dim, d_ff=cfg.ffn_dim,
                      num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                      relative_attention_num_buckets=cfg.num_buckets, relative_attention_max_distance=cfg.max_distance,
                      dropout_rate=0.0, layer_norm_epsilon=cfg.eps, feed_forward_proj="gated-gelu", **kw)


# ---- CLIP visual tower -> transformers CLIPVisionModel --------------------------------------------------

_CLIP_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
               "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}


def clip_to_transformers(sd: dict, prefix: str = "") -> dict:
    """Official `visual.*` keys (prefix removed) -> CLIPVisionModel keys. Every block present is mapped
    (the file holds all of them, the last included, plus post_norm); `head` (the contrastive projection)
    has no place in CLIPVisionModel and is dropped. transformers 4 nests the tower under `vision_model.`
    (pass it as `prefix`), transformers 5 does not."""
    p = prefix
    out = {}
    for k, v in sd.items():
        if k == "head":
            continue
        if k == "patch_embedding.weight":
            out[p + "embeddings.patch_embedding.weight"] = v
        elif k == "cls_embedding":
            out[p + "embeddings.class_embedding"] = v.reshape(-1)
        elif k == "pos_embedding":
            out[p + "embeddings.position_embedding.weight"] = v[0]
        elif k.startswith(("pre_norm.", "post_norm.")):
            name = "pre_layrnorm" if k.startswith("pre") else "post_layernorm"  # transformers' spelling
            out[f"{p}{name}.{k.split('.')[-1]}"] = v
        else:
            m = re.fullmatch(r"transformer\.(\d+)\.(.+)\.(weight|bias)", k)
            if not m:
                raise KeyError(f"no transformers name for official CLIP key {k!r}")
            i, layer, param = m.groups()
            prefix = f"{p}encoder.layers.{i}."
            if layer == "attn.to_qkv":
                for name, part in zip("qkv", v.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}_proj.{param}"] = part
            else:
                out[f"{prefix}{_CLIP_BLOCK[layer]}.{param}"] = v
    return out


def clip_transformers_config(cfg: CLIPConfig, **kw):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=cfg.dim, intermediate_size=cfg.dim * cfg.mlp_ratio,
                            num_attention_heads=cfg.num_heads, num_hidden_layers=cfg.num_layers,
                            image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="gelu",
                            layer_norm_eps=cfg.eps, projection_dim=cfg.out_dim, **kw)


def clip_image_processor(cfg: CLIPConfig):
    """Straight bicubic resize to S x S (no crop, aspect not kept) and the CLIP mean/std, like the official
    preprocessing; PIL's bicubic antialiases when it shrinks, torch's (ours) does not."""
    try:  # transformers >= 5 names the PIL implementation (the default one wants torchvision)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    s = cfg.image_size
    return CLIPImageProcessor(do_resize=True, size={"height": s, "width": s}, resample=3, do_center_crop=False,
                              do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                              image_mean=list(cfg.mean), image_std=list(cfg.std), do_convert_rgb=True)


# ---- scheduler ---------------------------------------------------------------------------------------------

# The official FlowUniPCMultistepScheduler starts its sigmas at 1 - 1/1000 read back from a fp32 tensor;
# diffusers' own flow sigmas start at 1 and stop at 1/1000, which gives other timesteps (..., 255 instead of
# 245 at 50 steps / shift 16), so the pipeline's scheduler is handed the official linspace explicitly.
OFFICIAL_SIGMA_MAX = float(np.float32(1 - 1 / 1000))


def official_unipc_scheduler(shift: float):
    """diffusers' UniPC configured like the official solver (flow prediction, bh2, order 2, final sigma 0)
    whose `set_timesteps(n)` builds the official schedule."""
    from diffusers import UniPCMultistepScheduler

    class OfficialFlowUniPC(UniPCMultistepScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
            if sigmas is None:
                sigmas = np.linspace(OFFICIAL_SIGMA_MAX, 0.0, num_inference_steps + 1)[:-1]
            super().set_timesteps(device=device, sigmas=sigmas, mu=mu)
            # step by index: matching by timestep value goes wrong when two timesteps are equal (few steps)
            self.set_begin_index(0)

    return OfficialFlowUniPC(num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
                             predict_x0=True, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero",
                             use_flow_sigmas=True, flow_shift=float(shift))


# ---- the peer pipeline ---------------------------------------------------------------------------------------

def _empty(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Parameters on meta (nothing allocated), buffers real: diffusers computes its RoPE tables in __init__."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def _fill(model: torch.nn.Module, source: dict, dtype, device, origin: str) -> torch.nn.Module:
    """checkpoint.fill straight to (device, dtype); buffers diffusers built real follow the model."""
    return ck.fill(model, source, dtype, origin, device=device).to(device)


def _eager(sd: dict[str, torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    """Getters of in-memory tensors; one tensor under several names (T5's tied embedding) gets one getter."""
    getters: dict[int, Callable[[], torch.Tensor]] = {}
    return {k: getters.setdefault(id(v), lambda v=v: v) for k, v in sd.items()}


def build_pipeline(ckpt_dir: str | os.PathLike, preset: Preset | None = None, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", shift: float | None = None):
    """diffusers' WanImageToVideoPipeline holding the weights of an official-layout checkpoint directory.

    Call it like the official FLF2V: `pipe(image=first, last_image=last, prompt=..., negative_prompt=...,
    height=H, width=W, num_frames=F, num_inference_steps=N, guidance_scale=g, generator=...)`.
    """
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

    ckpt_dir = Path(ckpt_dir)
    preset = preset or ck.preset_for(ckpt_dir)
    dit_cfg = ck.read_dit_config(ckpt_dir, preset.dit)
    device = torch.device(device)

    dit_src = {dit_key_to_diffusers(k): g for k, g in ck.dit_tensor_source(ckpt_dir).items()}
    transformer = _fill(_empty(lambda: WanTransformer3DModel(**dit_diffusers_config(dit_cfg))), dit_src, dtype,
                          device, str(ckpt_dir / ck.DIT_INDEX))
    vae_src = {vae_key_to_diffusers(k, preset.vae.num_res_blocks): g
               for k, g in ck.pth_tensor_source(ckpt_dir / ck.VAE_FILE).items()}
    vae = _fill(_empty(lambda: AutoencoderKLWan(**vae_diffusers_config(preset.vae))), vae_src, dtype, device,
                  str(ckpt_dir / ck.VAE_FILE))
    t5_sd = {k: g() for k, g in ck.pth_tensor_source(ckpt_dir / ck.T5_FILE).items()}
    text_encoder = _fill(_empty(lambda: UMT5EncoderModel(t5_transformers_config(preset.t5))),
                           _eager(t5_to_transformers(t5_sd)), dtype, device, str(ckpt_dir / ck.T5_FILE))
    clip_sd = {k: g() for k, g in ck.pth_tensor_source(ckpt_dir / ck.CLIP_FILE, prefix="visual.").items()}
    image_encoder = _empty(lambda: CLIPVisionModel(clip_transformers_config(preset.clip)))
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in image_encoder.state_dict()) else ""
    image_encoder = _fill(image_encoder, _eager(clip_to_transformers(clip_sd, prefix)), dtype, device,
                            str(ckpt_dir / ck.CLIP_FILE))
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir / ck.T5_TOKENIZER), local_files_only=True)
    scheduler = official_unipc_scheduler(preset.sample_shift if shift is None else shift)
    return WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                   image_processor=clip_image_processor(preset.clip), image_encoder=image_encoder,
                                   transformer=transformer)
