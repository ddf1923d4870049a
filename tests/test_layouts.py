"""Checkpoint layouts: the tiny official checkpoint written as a diffusers folder (by diffusers' and
transformers' own `save_pretrained`, from their module trees) and as ComfyUI's single files (official DiT and
VAE keys, transformers' umT5 / CLIP names), fp32, fp16 and fp8; each loads into the reference networks equal
to the official layout, bit for bit in fp32 and within fp8 rounding for fp8 files."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from flf2v.models import checkpoint as ck
from flf2v.models.fingerprint import content_fingerprint, describe
from flf2v.models.keymaps import t5_to_transformers
from flf2v.models.make_tiny import write_tiny_checkpoint

FP8 = torch.float8_e4m3fn
# e4m3fn rounding: 3 mantissa bits, so half an ulp is 2^-4 of a normal value (|x| >= 2^-6); below,
# subnormals are spaced 2^-9 apart: half a spacing 2^-10 absolute.
FP8_REL, FP8_ABS = 2.0 ** -4, 2.0 ** -10


def write_diffusers(official, out):
    """A diffusers folder as diffusers writes it: the peer pipeline (official weights in diffusers' and
    transformers' classes) saved with small shards, so the index-and-shards path is taken too."""
    from flf2v.bench.diffusers_peer import build_pipeline
    build_pipeline(official).save_pretrained(out, max_shard_size="300KB")
    return out


def write_comfyui(official, diffusers, out, dtype=torch.float32, dit_prefix="model.diffusion_model.",
                  dit_dtype=None):
    """ComfyUI's repackaged files: the DiT and the VAE with official keys (the DiT under ComfyUI's model
    prefix), umT5 and CLIP ViT-H as transformers saved them (`vision_model.` names, a projection head)."""
    out.mkdir(parents=True)
    dit = {k: g() for k, g in ck.dit_tensor_source(official).items()}
    save_file({dit_prefix + k: v.to(dit_dtype or dtype) for k, v in dit.items()},
              out / "wan2.1_flf2v_720p_14B_fp16.safetensors")
    t5 = _folder_tensors(diffusers / "text_encoder")
    save_file({k: v.to(dtype) for k, v in t5.items()}, out / "umt5_xxl_fp16.safetensors")
    clip = _folder_tensors(diffusers / "image_encoder")
    clip = {k if k.startswith("vision_model.") else "vision_model." + k: v.to(dtype) for k, v in clip.items()}
    clip["visual_projection.weight"] = torch.zeros(32, 64, dtype=dtype)  # CLIPVisionModelWithProjection's head
    save_file(clip, out / "clip_vision_h.safetensors")
    vae = {k: g() for k, g in ck.pth_tensor_source(official / ck.VAE_FILE).items()}
    save_file({k: v.to(dtype) for k, v in vae.items()}, out / "wan_2.1_vae.safetensors")
    shutil.copytree(official / ck.T5_TOKENIZER, out / "tokenizer")
    return out


def _folder_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module", params=["tiny", "tiny-i2v"])
def layouts(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"layouts-{request.param}")
    official = write_tiny_checkpoint(root / "official", request.param)
    diffusers = write_diffusers(official, root / "diffusers")
    comfy = write_comfyui(official, diffusers, root / "comfyui")
    bare = write_comfyui(official, diffusers, root / "comfyui-bare", dit_prefix="")
    return {"official": official, "diffusers": diffusers, "comfyui": comfy, "comfyui-bare": bare}


def _state(ckpt, component):
    return {k: v.float() for k, v in ck.load(ckpt, component).state_dict().items()}


@pytest.mark.parametrize("layout", ["diffusers", "comfyui", "comfyui-bare"])
def test_every_network_equals_the_official_layout(layouts, layout):
    assert ck.preset_for(layouts[layout]) == ck.preset_for(layouts["official"])
    assert describe(layouts[layout])["layout"] == layout.split("-")[0]
    for component in ck.COMPONENTS:
        want, got = _state(layouts["official"], component), _state(layouts[layout], component)
        assert want.keys() == got.keys(), component
        diff = [k for k in want if not torch.equal(want[k], got[k])]
        assert not diff, f"{layout} {component}: {len(diff)} tensors differ from the official layout, e.g. {diff[:3]}"
    assert content_fingerprint(layouts[layout]) == content_fingerprint(layouts["official"])


def test_three_step_video_equals_the_official_layout(layouts, demo_frames):
    from flf2v.runtime.pipeline import Pipeline

    videos = {}
    last = demo_frames[1] if ck.preset_for(layouts["official"]).dit.model_type == "flf2v" else None
    for layout in ("official", "diffusers", "comfyui"):
        pipe = Pipeline.from_checkpoint(layouts[layout])
        videos[layout] = pipe.generate("a red ball", demo_frames[0], last, size="64*64", frame_num=5,
                                       sample_steps=3, seed=3, progress=False)
    for layout in ("diffusers", "comfyui"):
        err = (videos[layout].float() - videos["official"].float()).abs().max().item()
        assert torch.equal(videos[layout], videos["official"]), f"{layout}: max abs {err:.3g} from official"


def test_fp16_files_load_as_their_rounded_weights_and_fingerprint_apart(layouts, tmp_path):
    half = write_comfyui(layouts["official"], layouts["diffusers"], tmp_path / "half", dtype=torch.float16)
    assert describe(half)["dtypes"] == {"dit": "float16", "t5": "float16", "clip": "float16", "vae": "float16"}
    want, got = _state(layouts["official"], "dit"), _state(half, "dit")
    diff = [k for k in want if not torch.equal(want[k].half().float(), got[k])]
    assert not diff, f"{len(diff)} DiT tensors are not the fp16 rounding of the official ones: {diff[:3]}"
    # other numbers, other engines: the fingerprint says so
    assert content_fingerprint(half) != content_fingerprint(layouts["official"])


def test_fp8_dit_file_loads_within_fp8_rounding(layouts, tmp_path):
    fp8 = write_comfyui(layouts["official"], layouts["diffusers"], tmp_path / "fp8", dit_dtype=FP8)
    assert describe(fp8)["dtypes"]["dit"] == "float8_e4m3fn"
    want, got = _state(layouts["official"], "dit"), _state(fp8, "dit")
    for k, w in want.items():
        assert torch.equal(got[k], w.to(FP8).float()), f"{k}: not the e4m3fn rounding of the official weight"
        bound = FP8_REL * w.abs() + FP8_ABS
        err = (got[k] - w).abs()
        assert (err <= bound).all(), f"{k}: max abs {err.max():.3g} over the e4m3fn bound"


def test_fp8_dit_file_loads_as_fp8_for_the_8bit_path(layouts, tmp_path):
    """--quant fp8 takes a ComfyUI fp8 DiT's block weights as they are stored (scale 1), with no bf16 round
    trip: each FP8Linear holds the file's bytes; the rest of the DiT is the file's values in the run dtype."""
    from flf2v.models.lora import load_dit
    from flf2v.models.quant import FP8Linear, block_linear_names
    fp8 = write_comfyui(layouts["official"], layouts["diffusers"], tmp_path / "fp8", dit_dtype=FP8)
    stored = {k[len("model.diffusion_model."):]: v for k, v in
              load_file(fp8 / "wan2.1_flf2v_720p_14B_fp16.safetensors").items()}
    dit = load_dit(fp8, torch.float32, quant="fp8")
    names = block_linear_names(dit)
    assert names and all(isinstance(dit.get_submodule(n), FP8Linear) for n in names)
    for n in names:
        layer = dit.get_submodule(n)
        assert layer.weight.dtype == FP8 and torch.equal(layer.weight.view(torch.uint8),
                                                         stored[f"{n}.weight"].view(torch.uint8)), n
        assert torch.equal(layer.weight_scale, torch.ones(layer.out_features)), f"{n}: scale is not 1"
        assert torch.equal(layer.bias, stored[f"{n}.bias"].float()), n
    head = dit.head.head.weight
    assert head.dtype == torch.float32 and torch.equal(head, stored["head.head.weight"].float())


def test_scaled_fp8_umt5_applies_its_scales(layouts, tmp_path):
    """ComfyUI's umt5_xxl_fp8_e4m3fn_scaled convention (comfy/ops.py scaled_fp8_ops): each linear weight
    stored as fp8 of weight / scale with `<module>.scale_weight` = scale (fp32 scalar), read back as
    fp8 * scale; a `scaled_fp8` marker; the embedding, norms and relative attention biases stay 16-bit."""
    folder = write_comfyui(layouts["official"], layouts["diffusers"], tmp_path / "scaled")
    t5 = load_file(folder / "umt5_xxl_fp16.safetensors")
    scaled = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for k, v in t5.items():
        if k.endswith(".weight") and v.dim() == 2 and "embed" not in k and "shared" not in k and "bias" not in k:
            scale = v.abs().max() / 448.0
            scaled[k] = (v / scale).to(FP8)
            scaled[k.removesuffix("weight") + "scale_weight"] = scale.reshape(()).float()
        else:
            scaled[k] = v.to(torch.float16)
    (folder / "umt5_xxl_fp16.safetensors").unlink()
    save_file(scaled, folder / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    want, got = _state(layouts["official"], "t5"), _state(folder, "t5")
    names = {k: n for n, k in t5_to_transformers({k: k for k in want}).items()}
    for k, w in want.items():
        name = names[k]
        scale = scaled.get(name.removesuffix("weight") + "scale_weight")
        if scale is None:
            assert torch.equal(got[k], w.half().float()), k
            continue
        assert torch.equal(got[k], scaled[name].float() * scale), f"{k}: not fp8 * scale_weight"
        err = (got[k] - w).abs()
        assert (err <= FP8_REL * w.abs() + FP8_ABS * scale).all(), f"{k}: max abs {err.max():.3g} over the bound"


# ---- bad input: one line naming the problem and the fix ----------------------------------------------------

def _error(fn, *args) -> str:
    with pytest.raises(ck.CheckpointError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture
def comfy_copy(layouts, tmp_path):
    return shutil.copytree(layouts["comfyui"], tmp_path / "c", symlinks=True)


def test_a_folder_with_two_layouts_is_refused(layouts, tmp_path):
    mixed = shutil.copytree(layouts["official"], tmp_path / "mixed")
    shutil.copy(layouts["diffusers"] / "model_index.json", mixed)
    assert "two checkpoint layouts" in _error(ck.preset_for, mixed)
    other = shutil.copytree(layouts["official"], tmp_path / "with-comfy")
    shutil.copy(layouts["comfyui"] / "wan_2.1_vae.safetensors", other)
    assert "official files" in _error(ck.preset_for, other) and "single .safetensors" in _error(ck.preset_for, other)
    # a LoRA beside the official files is not a second layout
    lora = shutil.copytree(layouts["official"], tmp_path / "with-lora")
    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 64)}, lora / "style.safetensors")
    assert ck.preset_for(lora) == ck.preset_for(layouts["official"])


def test_truncated_and_damaged_files_are_named(comfy_copy):
    f = comfy_copy / "wan2.1_flf2v_720p_14B_fp16.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    msg = _error(ck.preset_for, comfy_copy)
    assert f.name in msg and "re-download" in msg, msg


def test_dits_of_other_models_are_refused(layouts, comfy_copy):
    f = comfy_copy / "wan2.1_flf2v_720p_14B_fp16.safetensors"
    sd = load_file(f)
    t2v = {k: v for k, v in sd.items() if "img_emb" not in k and "_img" not in k}  # no image conditioning
    save_file(t2v, f)
    msg = _error(ck.preset_for, comfy_copy)
    assert "T2V DiT" in msg and "FLF2V-14B and I2V-14B" in msg, msg
    wide = {k: torch.zeros(96, *v.shape[1:]) if k.endswith("patch_embedding.weight") else v for k, v in sd.items()}
    save_file(wide, f)  # a DiT of another width, as the 1.3B (1536) is to the 14B (5120)
    assert "of width 96" in _error(ck.preset_for, comfy_copy)


def test_missing_and_unexpected_keys_are_named(layouts, comfy_copy):
    f = comfy_copy / "clip_vision_h.safetensors"
    sd = load_file(f)
    save_file({**sd, "vision_model.extra.weight": torch.zeros(1)}, f)
    msg = _error(ck.load, comfy_copy, "clip")
    assert "unexpected key 'vision_model.extra.weight'" in msg and f.name in msg, msg
    sd.pop("vision_model.encoder.layers.0.self_attn.k_proj.weight")
    save_file(sd, f)
    msg = _error(ck.load, comfy_copy, "clip")
    assert ("missing key 'vision_model.encoder.layers.0.self_attn.k_proj.weight' (official "
            "'transformer.0.attn.to_qkv.weight')") in msg, msg


def test_comfyui_folder_needs_one_file_per_network_and_a_tokenizer(comfy_copy):
    shutil.copy(comfy_copy / "wan2.1_flf2v_720p_14B_fp16.safetensors", comfy_copy / "wan2.1_flf2v_fp8.safetensors")
    msg = _error(ck.preset_for, comfy_copy)
    assert "2 dit files" in msg and "keep one" in msg and "instead of --ckpt_dir" in msg, msg
    (comfy_copy / "wan2.1_flf2v_fp8.safetensors").unlink()
    shutil.rmtree(comfy_copy / "tokenizer")
    msg = _error(ck.load_tokenizer, comfy_copy)
    assert "tokenizer" in msg and "--tokenizer DIR" in msg, msg


def _files(c):
    return {"dit": c / "wan2.1_flf2v_720p_14B_fp16.safetensors", "t5": c / "umt5_xxl_fp16.safetensors",
            "clip": c / "clip_vision_h.safetensors", "vae": c / "wan_2.1_vae.safetensors"}


def test_files_given_one_by_one_make_one_folder(layouts, tmp_path):
    from flf2v.models.layouts import file_view
    c = layouts["comfyui"]
    files = _files(c)
    view = file_view(files, c / "tokenizer", tmp_path / "views")
    assert view == file_view(files, c / "tokenizer", tmp_path / "views")
    assert content_fingerprint(view) == content_fingerprint(layouts["official"])
    assert ck.load_tokenizer(view) is not None
    # without --tokenizer, the one beside the files (as for a folder of them), not "no umT5 tokenizer"
    assert (file_view(files, None, tmp_path / "views") / "tokenizer").resolve() == (c / "tokenizer").resolve()
    msg = _error(file_view, {**files, "t5": files["clip"]}, None, tmp_path / "views")
    assert "--t5" in msg and "pass it as --clip" in msg, msg
    assert "--vae missing" in _error(file_view, {**files, "vae": None}, None, tmp_path / "views")


def test_files_given_one_by_one_with_an_unwritable_cache_name_the_fix(layouts, tmp_path):
    """The folder of links lives in $XDG_CACHE_HOME (~/.cache): a read-only HOME said only "Read-only file system
    (~/.cache)"."""
    from flf2v.models.layouts import file_view
    (tmp_path / "afile").write_text("x")  # a cache that cannot hold a folder, as a read-only one cannot
    msg = _error(file_view, _files(layouts["comfyui"]), None, tmp_path / "afile" / "checkpoints")
    assert "set XDG_CACHE_HOME to a writable folder" in msg and "--ckpt_dir" in msg, msg


# ---- the command line: flf2v-run and flf2v-build with each layout ----------------------------------

def _file_flags(c, tokenizer=True):
    flags = [x for role, f in _files(c).items() for x in (f"--{role}", str(f))]
    return flags + (["--tokenizer", str(c / "tokenizer")] if tokenizer else [])


def _run_args(layouts, demo_frames, out, *ckpt):
    last = ["--last_frame", str(demo_frames[1])] if ck.preset_for(layouts["official"]).dit.model_type == "flf2v" else []
    return [*ckpt, "--first_frame", str(demo_frames[0]), *last, "--prompt", "a red ball", "--size", "64*64",
            "--frame_num", "5", "--sample_steps", "2", "--base_seed", "3", "--save_file", str(out), "--quiet",
            "--backend", "torch"]


def test_cli_runs_each_layout_to_the_official_video(layouts, demo_frames, tmp_path, capsys, monkeypatch):
    import json

    from helpers import run, saved_videos
    saved = saved_videos(monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ways = {"official": ["--ckpt_dir", str(layouts["official"])],
            "diffusers": ["--ckpt_dir", str(layouts["diffusers"])],
            "comfyui": _file_flags(layouts["comfyui"])}
    videos = {}
    for name, ckpt in ways.items():
        out, metrics = tmp_path / f"{name}.mp4", tmp_path / f"{name}.json"
        assert run(_run_args(layouts, demo_frames, out, *ckpt, "--metrics", str(metrics))) == 0, capsys.readouterr()
        said = capsys.readouterr().out
        m = json.loads(metrics.read_text())["checkpoint"]
        assert m["layout"] == name and m["dtypes"]["dit"] == "float32", m
        assert f": {name} layout, " in said and "dit float32" in said, said
        videos[name] = saved[str(out)]
    for name in ("diffusers", "comfyui"):
        diff = (videos[name] - videos["official"]).abs().max().item()
        assert torch.equal(videos[name], videos["official"]), f"{name}: max abs {diff:.3g} from official"


def _bad_case(layouts, tmp_path, case):
    """(checkpoint flags, what the one line must say) of one user mistake."""
    official, comfy = layouts["official"], layouts["comfyui"]
    if case == "mixed":
        mixed = shutil.copytree(official, tmp_path / "mixed")
        shutil.copy(layouts["diffusers"] / "model_index.json", mixed)
        return ["--ckpt_dir", str(mixed)], "two checkpoint layouts"
    if case == "official-vae":  # a .pth: its tensors' shapes from the memory-mapped file, none read
        o = shutil.copytree(official, tmp_path / "o")
        sd = torch.load(o / ck.VAE_FILE, weights_only=True)
        key = next(iter(sd))
        torch.save({**sd, key: torch.zeros(3, *sd[key].shape)}, o / ck.VAE_FILE)
        return ["--ckpt_dir", str(o)], f"{ck.VAE_FILE}: {key!r} has shape (3, "
    if case == "int-vae":  # integer weights: a traceback from load_state_dict, and engines built without a word
        o = shutil.copytree(official, tmp_path / "o")
        sd = torch.load(o / ck.VAE_FILE, weights_only=True)
        key = next(k for k, v in sd.items() if v.is_floating_point())
        torch.save({**sd, key: sd[key].long()}, o / ck.VAE_FILE)
        return ["--ckpt_dir", str(o)], f"{ck.VAE_FILE}: {key!r} is stored as torch.int64, not as floating point"
    c = shutil.copytree(comfy, tmp_path / "c")
    dit = c / "wan2.1_flf2v_720p_14B_fp16.safetensors"
    if case == "truncated":
        dit.write_bytes(dit.read_bytes()[:1000])
        return ["--ckpt_dir", str(c)], f"{dit.name}: unreadable safetensors file"
    if case == "int-dit":
        save_file({k: v.int() if k.endswith("cross_attn.k.weight") else v for k, v in load_file(dit).items()}, dit)
        return _file_flags(c), f"{dit.name}: 'blocks.0.cross_attn.k.weight' is stored as torch.int32, not as floating"
    if case == "t2v":
        save_file({k: v for k, v in load_file(dit).items() if "img_emb" not in k and "_img" not in k}, dit)
        return _file_flags(c), "T2V DiT"
    if case == "other-t5":  # a umT5 without the per-block position biases (T5 v1.1's layout, as Flux's t5xxl)
        t5 = c / "umt5_xxl_fp16.safetensors"
        save_file({k: v for k, v in load_file(t5).items() if "relative_attention_bias" not in k or ".block.0." in k},
                  t5)
        return ["--ckpt_dir", str(c)], f"{t5.name}: missing key 'encoder.block.1.layer.0.SelfAttention.relative"
    if case == "other-clip":  # a CLIP tower of another width: only the files' headers can tell before it loads
        clip = c / "clip_vision_h.safetensors"
        save_file({k: torch.zeros(*v.shape[:-1], v.shape[-1] + 16) if k.endswith("class_embedding") else v
                   for k, v in load_file(clip).items()}, clip)
        return ["--ckpt_dir", str(c)], f"{clip.name}: 'cls_embedding' has shape (1, 1, 80), the model needs (1, 1, 64)"
    if case == "dit-part":  # one shard of a sharded DiT holds the head but not the patch embedding
        save_file({k: v for k, v in load_file(dit).items() if "patch_embedding" not in k}, dit)
        return _file_flags(c), "a part of a DiT (no patch_embedding.weight)"
    if case in ("no-tokenizer", "empty-tokenizer"):  # the files with no tokenizer beside them, or a broken one
        bare = tmp_path / "bare"
        bare.mkdir()
        for f in _files(comfy).values():
            shutil.copy(f, bare)
        if case == "no-tokenizer":
            return _file_flags(bare, tokenizer=False), ("the files of --dit/--t5/--clip/--vae have no umT5 tokenizer "
                                                        "beside them (ComfyUI keeps it in its own code); pass "
                                                        "--tokenizer DIR")
        (bare / "tokenizer").mkdir()  # the transformers error behind it suggested installing sentencepiece
        return _file_flags(bare), f"{(bare / 'tokenizer').resolve()}: no usable umT5 tokenizer there ("
    if case == "unknown-names":  # e.g. a diffusers transformer saved as one file
        save_file({"transformer_blocks.0.attn1.to_q.weight": torch.zeros(2, 2)}, dit)
        return _file_flags(c), "none of Wan2.1's networks under the official or ComfyUI names"
    return {"both": (["--ckpt_dir", str(official), "--dit", str(dit)], "not both"),
            "pth-as-file": ([*_file_flags(c), "--t5", str(official / ck.T5_FILE)], "a PyTorch .pth file"),
            "none": ([], "--ckpt_dir is required"),
            "swapped": ([*_file_flags(c), "--t5", str(c / "clip_vision_h.safetensors")], "pass it as --clip"),
            "tokenizer-official": (["--ckpt_dir", str(official), "--tokenizer", str(c / "tokenizer")],
                                   "drop --tokenizer")}[case]


@pytest.mark.parametrize("case", ["mixed", "truncated", "t2v", "other-t5", "other-clip", "official-vae", "both",
                                  "none", "swapped", "no-tokenizer", "empty-tokenizer", "tokenizer-official",
                                  "dit-part", "unknown-names", "pth-as-file", "int-dit", "int-vae"])
def test_cli_refuses_bad_checkpoints_in_one_line_before_any_weight_loads(layouts, demo_frames, tmp_path, capsys,
                                                                         monkeypatch, case):
    from helpers import run
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def loads(*a, **k):
        raise AssertionError("weights loaded before the checkpoint was checked")
    monkeypatch.setattr("flf2v.runtime.torch_backend.TorchBackend.__init__", loads)
    flags, says = _bad_case(layouts, tmp_path, case)
    out = tmp_path / "v.mp4"
    assert run(_run_args(layouts, demo_frames, out, *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_build_takes_the_files_and_records_the_layout(layouts, tmp_path, capsys, monkeypatch):
    import json

    from flf2v.export import build as B
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    c = layouts["comfyui"]
    assert B.main(["--ckpt_dir", str(layouts["official"]), *_file_flags(c), "--out", str(tmp_path / "e")]) == 2
    assert "not both" in capsys.readouterr().err
    assert B.main([*_file_flags(c), "--graphs", "clip", "--out", str(tmp_path / "e"), "--quiet"]) == 0
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert m["checkpoint"]["layout"] == "comfyui" and m["checkpoint"]["dtypes"]["dit"] == "float32", m["checkpoint"]
    assert m["checkpoint"]["fingerprint"] == content_fingerprint(layouts["official"])


def test_quant_gate_on_a_checkpoint_reads_every_layout(layouts, tmp_path):
    """`flf2v-bench quant --ckpt_dir` on the same weights in the three layouts reports the same errors."""
    import json

    from flf2v.bench.cli import main
    got = {}
    for name in ("official", "diffusers", "comfyui"):
        out = tmp_path / name
        assert main(["quant", "--ckpt_dir", str(layouts[name]), "--layers", "1", "--tokens", "32", "--out", str(out),
                     "--idle_wait", "0", "-q"]) == 0
        got[name] = json.loads(next(out.glob("*.json")).read_text())["dit"]["output"]
    # the same weights, mapped from each file at another alignment: AVX-512 GEMMs on AMD EPYC Zen 4
    # (family 25 model 17) then sum in another order (last-bit differences: 1.2e-7 relative measured);
    # a weight read wrong moves these far more
    want = {run: {k: pytest.approx(v, rel=1e-5) for k, v in figures.items()} for run, figures in got["official"].items()}
    assert got["diffusers"] == want and got["comfyui"] == want, got


def test_a_config_json_alone_is_no_checkpoint(tiny_ckpt, tmp_path):
    """flf2v-build refuses to write engines into a checkpoint folder; a folder holding only a config.json was
    taken for one (detect names the official layout by any of its file names)."""
    from flf2v.models.layouts import is_checkpoint
    (tmp_path / "config.json").write_text("{}")
    assert is_checkpoint(tiny_ckpt) and not is_checkpoint(tmp_path)
