"""CLIP visual tower: parity with transformers' CLIPVisionModel (penultimate layer), preprocessing against
an independent float64 bicubic, checkpoint keys, export, meta build."""
import numpy as np
import pytest
import torch

from flf2v.models.clip import CHECKPOINT_PREFIX, CLIPVisual, ignored_keys, preprocess
from flf2v.models.config import get_preset
from flf2v.models.keymaps import clip_to_transformers
# OpenAI CLIP's normalisation as transformers ships it for CLIPImageProcessor: an independent source, so a
# wrong constant in models/config.py fails here instead of passing through both sides of a comparison
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

CFG = get_preset("tiny").clip


def randomize(model: torch.nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.ndim == 1:  # biases, class embedding
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model


def official_visual_keys(cfg):
    """Keys of the official XLMRobertaCLIP.visual (VisionTransformer, pool_type 'token', pre_norm)."""
    keys = {"patch_embedding.weight", "cls_embedding", "pos_embedding", "pre_norm.weight", "pre_norm.bias",
            "post_norm.weight", "post_norm.bias", "head"}
    for i in range(cfg.num_layers):
        for n in ("norm1", "norm2", "attn.to_qkv", "attn.proj", "mlp.0", "mlp.2"):
            keys |= {f"transformer.{i}.{n}.weight", f"transformer.{i}.{n}.bias"}
    return keys


def test_keys_and_ignored_keys():
    model = CLIPVisual(CFG)
    official = {CHECKPOINT_PREFIX + k for k in official_visual_keys(CFG)}
    official |= {"log_scale", "textual.token_embedding.weight", "textual.blocks.0.attn.q.weight",
                 "textual.head.0.weight"}
    ignored = ignored_keys(CFG)
    kept = {k.removeprefix(CHECKPOINT_PREFIX) for k in official if not ignored(k)}
    assert kept == set(model.state_dict())
    last = CFG.num_layers - 1
    skipped = {k for k in official if ignored(k)}
    assert skipped == {k for k in official if not k.startswith("visual.") or k.startswith(
        (f"visual.transformer.{last}.", "visual.post_norm.", "visual.head"))}
    # the real 32-layer model: block 31 skipped, blocks 3 and 30 kept
    real = ignored_keys(get_preset("flf2v-14B").clip)
    assert real("visual.transformer.31.mlp.0.weight")
    assert not real("visual.transformer.3.mlp.0.weight") and not real("visual.transformer.30.norm1.bias")


def test_parity_vs_transformers_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf_cfg = CLIPVisionConfig(hidden_size=CFG.dim, intermediate_size=CFG.dim * CFG.mlp_ratio,
                              num_attention_heads=CFG.num_heads, num_hidden_layers=CFG.num_layers,
                              image_size=CFG.image_size, patch_size=CFG.patch_size, hidden_act="gelu",
                              layer_norm_eps=CFG.eps, attn_implementation="eager")
    model = randomize(CLIPVisual(CFG)).eval()
    ref = CLIPVisionModel(hf_cfg).eval()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in ref.state_dict()) else ""  # transformers 4
    missing, unexpected = ref.load_state_dict(clip_to_transformers(model.state_dict(), prefix), strict=False)
    # ours stops at the penultimate block: the reference's last block and post-norm (unused by
    # hidden_states[-2]) are all that is left unloaded
    last = (f"{prefix}encoder.layers.{CFG.num_layers - 1}.", f"{prefix}post_layernorm.")
    assert not unexpected and missing and all(k.startswith(last) for k in missing), (missing, unexpected)
    images = torch.randn(2, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(images)
        theirs = ref(pixel_values=images, output_hidden_states=True).hidden_states[-2]
    assert ours.shape == (2, CFG.num_tokens, CFG.dim)
    err, rel = (ours - theirs).abs().max().item(), ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert rel < 1e-5, f"max abs {err:.3e} rel {rel:.3e}"
    print(f"CLIP parity: max abs {err:.3e}, max rel {rel:.3e}")


def cubic_weights(src: float, a: float = -0.75):
    """Keys cubic convolution weights for taps floor(src)-1 .. floor(src)+2."""
    i = int(np.floor(src))
    t = src - i

    def k(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a if x < 2 else 0.0

    return [i - 1, i, i + 1, i + 2], [k(t + 1), k(t), k(1 - t), k(2 - t)]


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] resampling matrix: half-pixel centres (align_corners=False), edge taps clamped."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        idx, w = cubic_weights((o + 0.5) * n_in / n_out - 0.5)
        for i, wi in zip(idx, w):
            m[o, min(max(i, 0), n_in - 1)] += wi
    return m


@pytest.mark.parametrize("hw", [(37, 53), (300, 260)])  # upsampling and downsampling
def test_preprocess_vs_float64_bicubic(hw):
    h, w = hw
    s = CFG.image_size
    frames = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(2)) * 2 - 1
    out = preprocess(frames, CFG)
    assert torch.equal(preprocess(frames), out)  # the default config has the same size, mean and std
    x = frames.double().numpy()
    x = bicubic_matrix(h, s) @ x @ bicubic_matrix(w, s).T
    mean = np.array(OPENAI_CLIP_MEAN).reshape(1, 3, 1, 1)
    std = np.array(OPENAI_CLIP_STD).reshape(1, 3, 1, 1)
    want = torch.from_numpy(((x + 1) / 2 - mean) / std)
    assert out.shape == (2, 3, s, s) and out.dtype == torch.float32
    err = (out.double() - want).abs().max()
    rel = (err / want.abs().max()).item()
    # 5e-5: torch's fp32 bicubic computes source coordinates and weights in fp32 (its own fp64 path differs
    # from it by 4.8e-5 abs at 300 px); align_corners, antialias or another kernel would be off by ~1e-2.
    assert rel < 5e-5, f"max abs {err.item():.3e} rel {rel:.3e}"
    print(f"preprocess {hw}: max abs {err.item():.3e}, max rel {rel:.3e}")


@pytest.mark.parametrize("preset", ["flf2v-14B", "i2v-14B", "tiny"])
def test_normalisation_is_openai_clip(preset):
    cfg = get_preset(preset).clip
    for name, got, want in (("mean", cfg.mean, OPENAI_CLIP_MEAN), ("std", cfg.std, OPENAI_CLIP_STD)):
        err = np.abs(np.array(got) - np.array(want)).max()
        assert err < 1e-9, f"{preset} CLIP {name} {got} != OpenAI CLIP's {want} (max abs {err:.3e})"


def test_export_matches_eager():
    model = randomize(CLIPVisual(CFG)).eval()
    images = torch.randn(2, 3, CFG.image_size, CFG.image_size)
    prog = torch.export.export(model, (images,))
    with torch.no_grad():
        ref = model(images)
        out = prog.module()(images)
    assert torch.allclose(out, ref, rtol=0, atol=1e-5), (out - ref).abs().max()


def test_meta_build_then_assign():
    with torch.device("meta"):
        model = CLIPVisual(CFG)
    assert all(p.is_meta for p in model.parameters())
    real = randomize(CLIPVisual(CFG))
    model.load_state_dict(real.state_dict(), assign=True, strict=True)
    images = torch.randn(1, 3, CFG.image_size, CFG.image_size)
    with torch.no_grad():
        assert torch.equal(model(images), real(images))


def test_fp16_weights_fp32_norms():
    model = randomize(CLIPVisual(CFG)).eval()
    images = torch.randn(1, 3, CFG.image_size, CFG.image_size)
    with torch.no_grad():
        ref = model(images)
        out = model.to(torch.bfloat16)(images)
    assert out.dtype == torch.bfloat16
    rel = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    assert rel < 0.05, f"bf16 vs fp32 max rel {rel:.3e}"


def test_onnx_export_matches_eager(tmp_path):
    import onnxruntime as ort

    model = randomize(CLIPVisual(CFG)).eval()
    images = torch.randn(2, 3, CFG.image_size, CFG.image_size)
    prog = torch.onnx.export(model, (images,), dynamo=True, opset_version=23, verbose=False)
    assert "Attention" in {n.op_type for n in prog.model_proto.graph.node}
    prog.save(str(tmp_path / "clip.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "clip.onnx"), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: images.numpy()})[0])
    with torch.no_grad():
        ref = model(images)
    err, rel = (out - ref).abs().max().item(), ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-5, f"ORT vs eager: max abs {err:.3e} rel {rel:.3e}"
    print(f"CLIP ONNX/ORT: max abs {err:.3e}, max rel {rel:.3e}")


def test_a_bf16_run_computes_clip_in_fp16_as_the_official(tiny_ckpt):
    """The official runs CLIP in fp16 (wan_i2v_14B.clip_dtype) also when the DiT runs in bf16, whose 3 fewer
    mantissa bits give about 8x the error; the features feed every cross-attention of every step."""
    from conftest import rel_err

    from flf2v.models import checkpoint as ck
    from flf2v.runtime.torch_backend import TorchBackend
    preset = ck.preset_for(tiny_ckpt)
    size = preset.clip.image_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        want = ck.load_clip(tiny_ckpt, torch.float32, preset)(pixels)
        bf16 = ck.load_clip(tiny_ckpt, torch.bfloat16, preset)(pixels.bfloat16())
        got = TorchBackend(tiny_ckpt, preset, torch.bfloat16, torch.device("cpu")).encode_image(pixels)
    (abs_got, rel_got), (abs_bf16, rel_bf16) = rel_err(got, want), rel_err(bf16, want)
    assert got.dtype == torch.float16 and rel_got * 4 < rel_bf16, \
        f"{got.dtype} CLIP of a bf16 run: max abs {abs_got:.3g}, rel {rel_got:.3g}; bf16: {abs_bf16:.3g}, {rel_bf16:.3g}"
