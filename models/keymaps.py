"""Official Wan2.1 key names <-> diffusers' `WanTransformer3DModel` / `AutoencoderKLWan` and transformers'
`UMT5EncoderModel` / `CLIPVisionModel` names: the layouts users' other checkpoints use (diffusers folders,
ComfyUI's single files) and LoRAs are saved in.

Written from diffusers' and transformers' module trees (not from their converters, which the tests use as
the independent check). Tensors are renamed (T5's tied embedding shared, CLIP's fused qkv split), never copied.
"""
from __future__ import annotations

import re

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


# ---- CLIP visual tower -> transformers CLIPVisionModel --------------------------------------------------

def clip_key_to_transformers(key: str) -> list[str]:
    """transformers CLIPVisionModel names of one official visual-tower key (`visual.` removed): q, k and v
    for the fused qkv. transformers 4 nests them under `vision_model.`, transformers 5 does not."""
    whole = {"patch_embedding.weight": "embeddings.patch_embedding.weight",
             "cls_embedding": "embeddings.class_embedding", "pos_embedding": "embeddings.position_embedding.weight"}
    if key in whole:
        return [whole[key]]
    if key.startswith(("pre_norm.", "post_norm.")):  # transformers' spelling
        return [("pre_layrnorm." if key.startswith("pre") else "post_layernorm.") + key.split(".")[-1]]
    m = re.fullmatch(r"transformer\.(\d+)\.(.+)\.(weight|bias)", key)
    if not m:
        raise KeyError(f"no transformers name for official CLIP key {key!r}")
    i, layer, param = m.groups()
    if layer == "attn.to_qkv":
        return [f"encoder.layers.{i}.self_attn.{n}_proj.{param}" for n in "qkv"]
    block = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
             "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
    return [f"encoder.layers.{i}.{block[layer]}.{param}"]


def clip_to_transformers(sd: dict, prefix: str = "") -> dict:
    """Official `visual.*` tensors (prefix removed) -> CLIPVisionModel's. Every block present is mapped (the
    file holds all of them, the last included, plus post_norm); `head` (the contrastive projection) has no
    place in CLIPVisionModel and is dropped. `prefix`: "vision_model." for transformers 4."""
    out = {}
    for k, v in sd.items():
        if k == "head":
            continue
        names = clip_key_to_transformers(k)
        values = v.chunk(3, dim=0) if len(names) == 3 else [
            v.reshape(-1) if k == "cls_embedding" else v[0] if k == "pos_embedding" else v]
        out.update({prefix + n: t for n, t in zip(names, values)})
    return out
