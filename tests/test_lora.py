"""LoRAs merged into the DiT (models/lora.py): parity with diffusers + PEFT, with a hand merge and with a
checkpoint merged beforehand; scale 0 and sums of LoRAs; one-line refusals of bad files and arguments."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import rel_err
from flf2v.models import checkpoint as ck
from flf2v.models import lora as lr
from flf2v.models.keymaps import dit_key_to_diffusers
from flf2v.models.config import get_preset
from flf2v.models.make_tiny import write_dit_shards

R = 4  # LoRA rank
# (official module, alpha or None): linears in both blocks, the cross-attention image keys, the head and
# the time projection (no alpha there: diffusers reads none outside the blocks); patch_embedding, added
# in places, is a Conv3d (its LoRA pair is [r, 36, 1, 2, 2] / [dim, r, 1, 1, 1]).
PAIRS = [("blocks.0.self_attn.q", 8.0), ("blocks.0.self_attn.o", None), ("blocks.1.cross_attn.k", 2.0),
         ("blocks.1.cross_attn.v_img", 4.0), ("blocks.0.cross_attn.k_img", 4.0), ("blocks.0.ffn.0", 1.0),
         ("blocks.1.ffn.2", 16.0), ("head.head", None), ("time_projection.1", None)]
BIASES = ["blocks.0.self_attn.q.bias", "blocks.0.ffn.0.bias", "head.head.bias"]
BLOCK_LINEARS = [f"blocks.{i}.{m}" for i in range(2) for m in
                 [f"self_attn.{x}" for x in "qkvo"] + [f"cross_attn.{x}" for x in ("q", "k", "v", "o", "k_img", "v_img")]
                 + ["ffn.0", "ffn.2"]]


@pytest.fixture(scope="module")
def shapes(tiny_ckpt):
    return ck.dit_shapes(tiny_ckpt)


@pytest.fixture(scope="module")
def official(tiny_ckpt):
    return {k: g() for k, g in ck.dit_tensor_source(tiny_ckpt).items()}


@pytest.fixture(scope="module")
def inputs(tiny_ckpt):
    cfg = ck.read_dit_config(tiny_ckpt, get_preset("tiny").dit)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    context[:, 9:] = 0
    return (x, torch.tensor([777]), context, torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=g),
            torch.randn(1, 20, 2, 4, 6, generator=g))


def pair(shape, seed, rank=R):
    """Random (down, up) whose product is about half the size of a weight of `shape`."""
    g = torch.Generator().manual_seed(seed)
    fan_in = math.prod(shape[1:])
    down = torch.randn(rank, *shape[1:], generator=g) / math.sqrt(fan_in)
    up = torch.randn(shape[0], rank, *[1] * (len(shape) - 2), generator=g) * 0.5 / math.sqrt(rank)
    return down, up


def make_lora(shapes, pairs, biases=(), diffs=(), seed=0):
    """{official module: (down, up, alpha)}, {official bias/weight key: full delta}."""
    low = {m: (*pair(shapes[m + ".weight"], seed + i), a) for i, (m, a) in enumerate(pairs)}
    g = torch.Generator().manual_seed(seed + 100)
    full = {k: 0.3 * torch.randn(shapes[k], generator=g) for k in list(biases) + list(diffs)}
    return low, full


def write(path, low, full, fmt, metadata=None):
    """The same LoRA in one of the spellings users have."""
    sd = {}
    for m, (down, up, alpha) in low.items():
        if fmt == "peft":  # diffusers/PEFT: diffusers module names, no alpha tensors
            name = "transformer." + dit_key_to_diffusers(m + ".weight").removesuffix(".weight")
            sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = down, up
            continue
        name = {"official": "diffusion_model." + m, "official-AB": "diffusion_model." + m, "bare": m,
                "kohya": "lora_unet_" + m.replace(".", "_")}[fmt]
        a, b = ("lora_A", "lora_B") if fmt == "official-AB" else ("lora_down", "lora_up")
        sd[f"{name}.{a}.weight"], sd[f"{name}.{b}.weight"] = down, up
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    for k, d in full.items():
        module, _, leaf = k.rpartition(".")
        if fmt == "peft":
            assert leaf == "bias"
            sd["transformer." + dit_key_to_diffusers(module + ".weight").removesuffix(".weight") + ".lora_B.bias"] = d
        else:
            suffix = {"weight": "diff", "bias": "diff_b", "modulation": "diff_m"}[leaf]
            sd[f"{'diffusion_model.' if fmt.startswith('official') else ''}{module}.{suffix}"] = d
    save_file({k: v.clone() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def hand_merge(official, low, full, scale):
    """W + scale * alpha/rank * (up @ down) and W + scale * diff, written here, apart from models/lora.py."""
    out = dict(official)
    for m, (down, up, alpha) in low.items():
        w, rank = out[m + ".weight"], down.shape[0]
        prod = torch.einsum("or,ri->oi", up.reshape(up.shape[0], -1), down.reshape(rank, -1))
        out[m + ".weight"] = w + scale * ((alpha or rank) / rank) * prod.reshape(w.shape)
    for k, d in full.items():
        out[k] = out[k] + scale * d
    return out


def ours(ckpt, loras, inputs, table=None):
    model = lr.load_dit(ckpt, loras=loras)
    if table is not None:
        model.time_table = table
    with torch.no_grad():
        return model(*inputs)


def diffusers_run(tiny_ckpt, official, files, inputs):
    """(output, its fp32 time-sinusoid table) of diffusers' WanTransformer3DModel with each (file, scale)
    loaded by diffusers' own Wan LoRA loader (its format conversion included) as PEFT adapters, unmerged."""
    pytest.importorskip("peft")
    from _diffusers_dit import build_diffusers_dit, diffusers_forward
    from diffusers.loaders import WanLoraLoaderMixin
    cfg = ck.read_dit_config(tiny_ckpt, get_preset("tiny").dit)
    model = build_diffusers_dit(cfg, official)
    for i, (path, _) in enumerate(files):
        state, meta = WanLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
        WanLoraLoaderMixin.load_lora_into_transformer(state, transformer=model, adapter_name=f"l{i}", metadata=meta)
    model.set_adapters([f"l{i}" for i in range(len(files))], weights=[s for _, s in files])
    with torch.no_grad():
        # our model is handed diffusers' fp32 time sinusoid, so that only the LoRA maths differs
        return diffusers_forward(model, cfg, *inputs), model.condition_embedder.timesteps_proj(torch.arange(1001))


# ---- parity with diffusers' own Wan LoRA loading ------------------------------------------------------

FORMATS = {  # format -> (pairs, full deltas, metadata)
    "peft": (PAIRS + [("patch_embedding", None)], BIASES, None),
    "peft-alpha-metadata": (PAIRS, [], {"lora_adapter_metadata": json.dumps(
        {"transformer.r": R, "transformer.lora_alpha": 8, "transformer.target_modules": ["to_q"]})}),
    # lora_B's bias takes the pair's alpha / r too (PEFT's lora_bias); the case above has no biases, "peft" no alpha
    "peft-alpha-bias": (PAIRS, BIASES, {"lora_adapter_metadata": json.dumps(
        {"transformer.r": R, "transformer.lora_alpha": 8, "transformer.lora_bias": True,
         "transformer.target_modules": ["to_q"]})}),
    "official": (PAIRS, BIASES, None),
    "official-AB": ([(m, None) for m, _ in PAIRS], BIASES[:2], None),
    "kohya": ([(m, 4.0 - i % 3) for i, m in enumerate(BLOCK_LINEARS)], [], None),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_parity_with_diffusers(fmt, tiny_ckpt, shapes, official, inputs, tmp_path):
    pairs, biases, meta = FORMATS[fmt]
    low, full = make_lora(shapes, pairs, biases, seed=len(fmt))
    if meta:  # diffusers builds its LoraConfig from the metadata: every LoRA'd module must be named there
        names = [dit_key_to_diffusers(m + ".weight").removesuffix(".weight") for m in low]
        meta = {"lora_adapter_metadata": json.dumps({**json.loads(meta["lora_adapter_metadata"]),
                                                     "transformer.target_modules": names})}
    path = write(tmp_path / f"{fmt}.safetensors", low, full, fmt.split("-alpha")[0], meta)
    scale = 0.7
    lora = lr.read_lora(path, shapes)
    assert set(lora.keys) == {m + ".weight" for m in low} | set(full)
    want, table = diffusers_run(tiny_ckpt, official, [(path, scale)], inputs)
    got = ours(tiny_ckpt, [(lora, scale)], inputs, table)
    abs_err, rel = rel_err(got, want)
    change = rel_err(ours(tiny_ckpt, None, inputs, table), want)[1]
    # measured (fp32, max abs / max |out|): peft 1.9e-6 / 5.2e-7, peft-alpha-metadata 2.1e-6 / 4.7e-7,
    # peft-alpha-bias 1.9e-6 / 4.1e-7, official 1.9e-6 / 5.0e-7, official-AB 1.4e-6 / 3.2e-7, kohya 9.5e-7 /
    # 2.7e-7 (diffusers runs the LoRA unmerged: x W^T + (x A^T) B^T); the LoRA itself changes the output by
    # 0.24..0.74 of its size
    assert rel < 2e-6 and change > 0.05, f"{fmt}: max abs {abs_err:.3g}, max rel {rel:.3g} (LoRA effect {change:.3g})"


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # PEFT: a second adapter, as meant
def test_two_loras_add_like_two_diffusers_adapters(tiny_ckpt, shapes, official, inputs, tmp_path):
    a = write(tmp_path / "a.safetensors", *make_lora(shapes, PAIRS, BIASES, seed=1), "official")
    # diffusers reads a kohya/musubi file only if it holds every block linear with its alpha
    b = write(tmp_path / "b.safetensors", *make_lora(shapes, [(m, 2.0) for m in BLOCK_LINEARS], seed=2), "kohya")
    files = [(a, 0.8), (b, -1.3)]
    want, table = diffusers_run(tiny_ckpt, official, files, inputs)
    got = ours(tiny_ckpt, lr.load_loras([f"{a}:0.8", (b, -1.3)], tiny_ckpt), inputs, table)
    abs_err, rel = rel_err(got, want)
    # measured: max abs 1.7e-6, max rel 4.7e-7
    assert rel < 2e-6, f"max abs {abs_err:.3g}, max rel {rel:.3g}"


# ---- what diffusers does not read: norm .diff, .diff_m, norm biases; merged-beforehand checkpoint -------

def test_equals_checkpoint_merged_beforehand(tiny_ckpt, shapes, official, inputs, tmp_path):
    """.diff on norms (diffusers drops them), .diff_b on a norm bias, .diff_m on a block's modulation and
    a conv LoRA with alpha: our load equals a checkpoint written with the LoRA merged by hand."""
    low, full = make_lora(shapes, PAIRS + [("patch_embedding", 2.0)], BIASES + ["blocks.0.norm3.bias"],
                          diffs=["blocks.0.norm3.weight", "blocks.1.cross_attn.norm_q.weight",
                                 "blocks.1.modulation"], seed=5)
    path = write(tmp_path / "diff.safetensors", low, full, "bare")  # official names without a prefix
    scale = -0.6
    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    merged = hand_merge(official, low, full, scale)
    write_dit_shards(merged_dir, json.loads((tiny_ckpt / ck.DIT_CONFIG).read_text()),
                     {k: (lambda v=v: v) for k, v in merged.items()}, [list(merged)])
    want = ours(merged_dir, None, inputs)
    lora = lr.read_lora(path, shapes)
    got = ours(tiny_ckpt, [(lora, scale)], inputs)
    abs_err, rel = rel_err(got, want)
    # measured: max abs 9.5e-7, max rel 2.2e-7 (W + s * delta rounded in another order)
    assert rel < 2e-6 and rel_err(ours(tiny_ckpt, None, inputs), want)[1] > 0.05, \
        f"max abs {abs_err:.3g}, max rel {rel:.3g}"
    for k in ("blocks.1.modulation", "blocks.0.norm3.weight", "patch_embedding.weight"):
        assert torch.allclose(merged[k], official[k] + scale * lora.delta(k), rtol=0, atol=1e-6), k


def test_scale_zero_is_no_lora_and_backend_keeps_loras(tiny_ckpt, shapes, inputs, tmp_path):
    from flf2v.runtime.torch_backend import TorchBackend
    lora = lr.read_lora(write(tmp_path / "z.safetensors", *make_lora(shapes, PAIRS, BIASES), "official"), shapes)
    assert torch.equal(ours(tiny_ckpt, [(lora, 0.0)], inputs), ours(tiny_ckpt, None, inputs))
    with pytest.raises(ValueError, match="DiT only"):
        ck.load(tiny_ckpt, "vae", loras=[(lora, 1.0)])
    backend = TorchBackend(tiny_ckpt, loras=[(lora, 0.5)])
    assert backend.loras == [(lora, 0.5)]
    want = lr.load_dit(tiny_ckpt, loras=[(lora, 0.5)]).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in backend.dit.state_dict().items())
    assert len(lora.fingerprint) == 32 and lora.fingerprint == lr.read_lora(lora.path, shapes).fingerprint


def test_a_scale_that_overflows_a_weight_is_refused_as_it_merges(tiny_ckpt, shapes, tmp_path):
    """Within float32's range, 3e38 still makes inf weights: a NaN video after the whole run before."""
    low, full = make_lora(shapes, PAIRS)
    low = {m: (down, up * 100, alpha) for m, (down, up, alpha) in low.items()}  # deltas well over 1
    lora = lr.read_lora(write(tmp_path / "big.safetensors", low, full, "official"), shapes)
    with pytest.raises(lr.LoRAError, match=r"overflows with the LoRAs merged \(big.safetensors:3e\+38\)") as e:
        lr.load_dit(tiny_ckpt, loras=[(lora, 3e38)])
    assert "\n" not in str(e.value)


# ---- arguments and refusals ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("a.safetensors", ("a.safetensors", 1.0)), ("a.safetensors:0.5", ("a.safetensors", 0.5)),
    ("d/x:y/a.safetensors:-1e-1", ("d/x:y/a.safetensors", -0.1)), (r"C:\l\a.safetensors", (r"C:\l\a.safetensors", 1.0)),
    ("a:2", ("a", 2.0))])
def test_parse_lora_arg(text, want):
    assert lr.parse_lora_arg(text) == want


@pytest.mark.parametrize("text", ["x.safetensors:abc", "x.safetensors:nan", "x.safetensors:inf", "x.safetensors:", ""])
def test_parse_lora_arg_refuses_bad_scales(text):
    with pytest.raises(lr.LoRAError, match="not a finite number|empty LoRA path") as e:
        lr.parse_lora_arg(text)
    assert "\n" not in str(e.value)


def _bad_files(tmp, shapes):
    good = make_lora(shapes, PAIRS[:2])
    unknown = {**good[0], "blocks.7.self_attn.q": good[0]["blocks.0.self_attn.q"]}  # tiny has blocks 0 and 1
    yield "unknown", write(tmp / "unknown.safetensors", unknown, {}, "official"), None, "blocks.7.self_attn.q"
    # a 1.3B-style LoRA: same names, width 48 instead of 64
    other = {m: (torch.randn(R, 48), torch.randn(48, R), 1.0) for m, _ in PAIRS[:3] if m.startswith("blocks")}
    yield "size", write(tmp / "size.safetensors", other, {}, "official"), None, r"another model size \(dim 48, .* dim 64\)"
    misfit = {**good[0], "blocks.1.self_attn.k": (torch.randn(R, 32), torch.randn(64, R), None)}
    yield "shape", write(tmp / "shape.safetensors", misfit, {}, "kohya"), None, \
        r"lora_unet_blocks_1_self_attn_k.* \(64, 32\).*\(64, 64\)"
    torch.save({"x": torch.zeros(1)}, tmp / "l.pt")
    yield "pickle", tmp / "l.pt", None, "pickles that can run code"
    shutil.copy(tmp / "l.pt", tmp / "renamed.safetensors")
    yield "renamed pickle", tmp / "renamed.safetensors", None, "is a pickle"
    data = (tmp / "unknown.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[:-40])
    yield "truncated", tmp / "cut.safetensors", None, "damaged"
    (tmp / "junk.safetensors").write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    yield "junk", tmp / "junk.safetensors", None, "damaged"
    Image.new("RGB", (8, 8)).save(tmp / "first.png")  # was told to download it again
    yield "photo", tmp / "first.png", None, "not a safetensors file"
    yield "huge scale", tmp / "unknown.safetensors", "1e39", "not a finite number"  # a traceback in the merge
    save_file({"diffusion_model.blocks.0.self_attn.q.hada_w1_a": torch.zeros(2, 2)}, str(tmp / "loha.safetensors"))
    yield "loha", tmp / "loha.safetensors", None, "does not read"
    yield "missing", tmp / "nope.safetensors", None, "no such LoRA file; give the path of an existing .safetensors"
    down, up, _ = good[0]["blocks.0.self_attn.q"]
    save_file({"blocks.0.self_attn.q.lora_down.weight": down}, str(tmp / "half.safetensors"))
    yield "half pair", tmp / "half.safetensors", None, "no matching lora_up"
    save_file({"blocks.0.self_attn.q.lora_down.weight": down, "blocks.0.self_attn.q.lora_up.weight": up,
               "blocks.0.self_attn.q.alpha": torch.ones(2)}, str(tmp / "alpha.safetensors"))
    yield "vector alpha", tmp / "alpha.safetensors", None, "not one finite number"
    for kind, value in (("bool", torch.tensor(True)), ("complex", torch.tensor(1 + 2j))):  # True merged as 1
        save_file({"blocks.0.self_attn.q.lora_down.weight": down, "blocks.0.self_attn.q.lora_up.weight": up,
                   "blocks.0.self_attn.q.alpha": value}, str(tmp / f"{kind}.safetensors"))
        yield f"{kind} alpha", tmp / f"{kind}.safetensors", None, "not one finite number"
    save_file({"blocks.0.self_attn.q.diff_b": down[0, :1].clone(), "transformer.blocks.0.attn1.to_q.lora_A.weight": down,
               "blocks.0.self_attn.q.lora_down.weight": down.clone()}, str(tmp / "twice.safetensors"))
    yield "twice", tmp / "twice.safetensors", None, "are the same LoRA tensor"
    nan = down.clone()
    nan[0, 0] = float("nan")
    save_file({"blocks.0.self_attn.q.lora_down.weight": nan, "blocks.0.self_attn.q.lora_up.weight": up},
              str(tmp / "nan.safetensors"))
    yield "nan", tmp / "nan.safetensors", None, "'blocks.0.self_attn.q.lora_down.weight' holds NaN or Inf"
    save_file({"blocks.0.self_attn.q.lora_down.weight": down.to(torch.int32), "blocks.0.self_attn.q.lora_up.weight": up},
              str(tmp / "int.safetensors"))
    yield "int", tmp / "int.safetensors", None, "'blocks.0.self_attn.q.lora_down.weight' is stored as torch.int32, not"
    yield "scale", tmp / "unknown.safetensors", "oops", "not a finite number"


def test_fp8_lora_reads_as_its_values_upcast_and_an_int_alpha_reads(tiny_ckpt, shapes, tmp_path):
    """fp8 LoRAs (shared for ComfyUI) raised NotImplementedError from torch.isfinite, a traceback; kohya may
    store alpha as an int64 scalar."""
    f8 = torch.float8_e4m3fn
    down, up = torch.randn(R, 64).to(f8), torch.randn(64, R).to(f8)
    name = "blocks.0.self_attn.q"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(R // 2)},
              str(tmp_path / "fp8.safetensors"))
    save_file({f"{name}.lora_down.weight": down.float(), f"{name}.lora_up.weight": up.float(),
               f"{name}.alpha": torch.tensor(R / 2)}, str(tmp_path / "fp32.safetensors"))
    got = lr.read_lora(tmp_path / "fp8.safetensors", shapes).delta(name + ".weight")
    want = up.float() @ down.float() * (R // 2) / R
    assert got.dtype == torch.float32 and torch.equal(got, lr.read_lora(tmp_path / "fp32.safetensors",
                                                                         shapes).delta(name + ".weight"))
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), f"max abs err {err:.3g}"


def test_lightx2v_prefixes_read_as_the_bare_names(tiny_ckpt, shapes, tmp_path):
    """LightX2V strips "model." and "unet." (its lora_loader.py); such a file was "a LoRA for another model"."""
    from safetensors.torch import load_file
    bare = write(tmp_path / "bare.safetensors", *make_lora(shapes, PAIRS, BIASES), "bare")
    want = lr.read_lora(bare, shapes)
    for prefix in ("model.", "unet."):
        path = tmp_path / f"{prefix}safetensors"
        save_file({prefix + k: v for k, v in load_file(str(bare)).items()}, str(path))
        got = lr.read_lora(path, shapes)
        keys = [m + ".weight" for m, _ in PAIRS] + BIASES
        assert all(torch.equal(got.delta(k), want.delta(k)) for k in keys), prefix
        assert all(want.delta(k).abs().max() > 0 for k in keys)


def test_kohya_names_of_diffusers_modules_and_lycoris_prefix_read_as_the_official_ones(tiny_ckpt, shapes, tmp_path):
    """kohya-style names of diffusers modules (lora_unet_blocks_0_attn1_to_q) and LyCORIS' "lycoris_" prefix (read
    by ComfyUI's Wan key map) were refused as "a LoRA for another model"."""
    low, full = make_lora(shapes, PAIRS)
    want = lr.read_lora(write(tmp_path / "official.safetensors", low, full, "official"), shapes)
    for fmt, spell in (("kohya-diffusers", lambda m: dit_key_to_diffusers(m + ".weight").removesuffix(".weight")),
                       ("lycoris", lambda m: m)):
        prefix = "lycoris_" if fmt == "lycoris" else "lora_unet_"
        sd = {}
        for m, (down, up, alpha) in low.items():
            name = prefix + spell(m).replace(".", "_")
            sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
            if alpha is not None:
                sd[f"{name}.alpha"] = torch.tensor(alpha)
        assert fmt == "lycoris" or "lora_unet_blocks_0_attn1_to_q.alpha" in sd, sorted(sd)  # diffusers' spelling
        save_file(sd, str(tmp_path / f"{fmt}.safetensors"))
        got = lr.read_lora(tmp_path / f"{fmt}.safetensors", shapes)
        keys = [m + ".weight" for m, _ in PAIRS]
        assert set(got.keys) == set(keys), (fmt, got.keys)
        assert all(torch.equal(got.delta(k), want.delta(k)) for k in keys), fmt


def test_the_api_takes_one_lora_as_well_as_a_list(tiny_ckpt, shapes, tmp_path):
    """loras="a.safetensors:0.8" was read as 24 LoRAs named by its characters ("a: no such LoRA file")."""
    path = write(tmp_path / "a.safetensors", *make_lora(shapes, PAIRS), "official")
    want = [(lr.read_lora(path, shapes).fingerprint, 0.8)]
    for spec in (f"{path}:0.8", (path, 0.8), [str(path), 0.8], [f"{path}:0.8"], [(path, 0.8)]):
        assert [(lo.fingerprint, s) for lo, s in lr.load_loras(spec, tiny_ckpt)] == want, spec
    for spec in ([(path,)], [(path, 0.8, 1)], [0.8], [None]):
        with pytest.raises(lr.LoRAError, match=r'give "PATH\[:SCALE\]" or \(path, scale\)') as e:
            lr.load_loras(spec, tiny_ckpt)
        assert "\n" not in str(e.value)
    with pytest.raises(lr.LoRAError, match=rf"{tmp_path}: a folder, not a LoRA file; pass the .safetensors file"):
        lr.load_loras([str(tmp_path)], tiny_ckpt)


def test_bad_inputs_fail_in_one_line(tiny_ckpt, shapes, tmp_path):
    seen = []
    for what, path, scale, pattern in _bad_files(tmp_path, shapes):
        with pytest.raises(lr.LoRAError, match=pattern) as e:
            lr.load_loras([(path, scale if scale is not None else 1.0)], tiny_ckpt)
        msg = str(e.value)
        assert "\n" not in msg and (path.name in msg or what == "scale"), f"{what}: {msg}"
        seen.append(what)
    assert len(seen) == 19
