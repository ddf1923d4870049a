"""diffusers' `WanImageToVideoPipeline` built on the very weights of an official-layout `--ckpt_dir` (renamed by
models/keymaps.py, cast one at a time while loading), and the diffusers / transformers configs of a preset's
networks: the peer the benchmark measures against, and the independent references of the tests.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from flf2v.models import checkpoint as ck
from flf2v.models.config import CLIPConfig, DiTConfig, Preset, T5Config, VAEConfig
from flf2v.models.keymaps import clip_to_transformers, dit_key_to_diffusers, t5_to_transformers, vae_key_to_diffusers


def dit_diffusers_config(cfg: DiTConfig) -> dict:
    """WanTransformer3DModel kwargs of the official FLF2V/I2V model with cfg's sizes."""
    return dict(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=cfg.eps, image_dim=cfg.clip_dim, added_kv_proj_dim=cfg.dim,
                rope_max_seq_len=cfg.rope_max_pos,
                pos_embed_seq_len=cfg.clip_tokens if cfg.model_type == "flf2v" else None)


def vae_diffusers_config(cfg: VAEConfig) -> dict:
    return dict(base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
                attn_scales=[], temperal_downsample=list(cfg.temperal_downsample), latents_mean=list(cfg.mean),
                latents_std=list(cfg.std))


def t5_transformers_config(cfg: T5Config, **kw):
    from transformers import UMT5Config
    return UMT5Config(vocab_size=cfg.vocab, d_model=cfg.dim, d_kv=cfg.head_dim, d_ff=cfg.ffn_dim,
                      num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                      relative_attention_num_buckets=cfg.num_buckets, relative_attention_max_distance=cfg.max_distance,
                      dropout_rate=0.0, layer_norm_epsilon=cfg.eps, feed_forward_proj="gated-gelu", **kw)


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
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel
    ckpt_dir, device = Path(ckpt_dir), torch.device(device)
    preset = preset or ck.preset_for(ckpt_dir)

    def empty(build):  # parameters on meta (nothing allocated), buffers real: diffusers builds RoPE tables in __init__
        with init_empty_weights(include_buffers=False):
            return build()

    def fill(model, source: dict, file: str):  # straight to (device, dtype); buffers built real follow the model
        return ck.fill(model, source, dtype, str(ckpt_dir / file), device=device).to(device)

    dit_cfg = ck.read_dit_config(ckpt_dir, preset.dit)
    transformer = fill(empty(lambda: WanTransformer3DModel(**dit_diffusers_config(dit_cfg))),
                       {dit_key_to_diffusers(k): g for k, g in ck.dit_tensor_source(ckpt_dir).items()}, ck.DIT_INDEX)
    vae = fill(empty(lambda: AutoencoderKLWan(**vae_diffusers_config(preset.vae))),
               {vae_key_to_diffusers(k, preset.vae.num_res_blocks): g
                for k, g in ck.pth_tensor_source(ckpt_dir / ck.VAE_FILE).items()}, ck.VAE_FILE)
    t5_sd = {k: g() for k, g in ck.pth_tensor_source(ckpt_dir / ck.T5_FILE).items()}
    text_encoder = fill(empty(lambda: UMT5EncoderModel(t5_transformers_config(preset.t5))),
                        _eager(t5_to_transformers(t5_sd)), ck.T5_FILE)
    clip_sd = {k: g() for k, g in ck.pth_tensor_source(ckpt_dir / ck.CLIP_FILE, prefix="visual.").items()}
    image_encoder = empty(lambda: CLIPVisionModel(clip_transformers_config(preset.clip)))
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in image_encoder.state_dict()) else ""
    image_encoder = fill(image_encoder, _eager(clip_to_transformers(clip_sd, prefix)), ck.CLIP_FILE)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir / ck.T5_TOKENIZER), local_files_only=True)
    scheduler = official_unipc_scheduler(preset.sample_shift if shift is None else shift)
    return WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                   image_processor=clip_image_processor(preset.clip), image_encoder=image_encoder,
                                   transformer=transformer)
