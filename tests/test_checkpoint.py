"""Checkpoint layout written by flf2v-make-tiny and the loaders that read it (and refuse bad files)."""
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from flf2v.models import checkpoint as ck
from flf2v.models.config import get_preset


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_official_layout(tiny_ckpt):
    names = {p.name for p in tiny_ckpt.iterdir()}
    for f in (ck.DIT_CONFIG, ck.DIT_INDEX, ck.T5_FILE, ck.CLIP_FILE, ck.VAE_FILE, "google", ck.CLIP_TOKENIZER):
        assert f in names, f"{f} missing from {sorted(names)}"
    index = json.loads((tiny_ckpt / ck.DIT_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"diffusion_pytorch_model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    cfg = json.loads((tiny_ckpt / ck.DIT_CONFIG).read_text())
    assert cfg["model_type"] == "flf2v" and cfg["in_dim"] == 36 and cfg["out_dim"] == 16
    # stored like the official files: DiT fp32, umT5 bf16, CLIP with both towers
    dit = {}
    for s in shards:
        dit.update(load_file(tiny_ckpt / s))
    assert all(v.dtype == torch.float32 for v in dit.values())
    assert "img_emb.emb_pos" in dit and "blocks.1.cross_attn.k_img.weight" in dit
    t5 = torch.load(tiny_ckpt / ck.T5_FILE, weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in t5.values()) and "blocks.0.pos_embedding.embedding.weight" in t5
    clip = torch.load(tiny_ckpt / ck.CLIP_FILE, weights_only=True)
    assert "log_scale" in clip and any(k.startswith("textual.") for k in clip)
    assert "visual.transformer.2.attn.to_qkv.weight" in clip  # the last block, unused for video


def _assert_same(model, reference: dict, prefix=""):
    sd = model.state_dict()
    for k, v in sd.items():
        ref = reference[prefix + k].to(v.dtype)
        assert torch.equal(v, ref), f"{k}: loaded tensor differs from the file (max abs {(v - ref).abs().max()})"


def test_loaders_read_the_files(tiny_ckpt):
    index = json.loads((tiny_ckpt / ck.DIT_INDEX).read_text())
    dit_file = {}
    for s in set(index["weight_map"].values()):
        dit_file.update(load_file(tiny_ckpt / s))
    _assert_same(ck.load_dit(tiny_ckpt), dit_file)
    _assert_same(ck.load_t5(tiny_ckpt), torch.load(tiny_ckpt / ck.T5_FILE, weights_only=True))
    _assert_same(ck.load_clip(tiny_ckpt), torch.load(tiny_ckpt / ck.CLIP_FILE, weights_only=True), "visual.")
    _assert_same(ck.load_vae(tiny_ckpt), torch.load(tiny_ckpt / ck.VAE_FILE, weights_only=True))


def _reading(monkeypatch) -> set:
    """The DiT keys the loaders read from here on (ck.tensor_source's getters, wrapped)."""
    read, real = set(), ck.tensor_source

    def recording(*args, **kw):
        source, origin, ignore = real(*args, **kw)
        wrap = lambda k, g: lambda: read.add(k) or g()  # noqa: E731
        return {k: wrap(k, g) for k, g in source.items()}, origin, ignore
    monkeypatch.setattr(ck, "tensor_source", recording)
    return read


def test_dit_slice_and_blocks_read_only_their_weights(tiny_ckpt, monkeypatch):
    """`layers=1` is the whole DiT's first block with its embeddings and head (same weights, same output as
    the whole DiT cut after loading), `blocks_only` the blocks alone; neither reads what it leaves out."""
    from flf2v.models.lora import load_dit
    from flf2v.models.quant import FP8Linear
    whole = ck.load_dit(tiny_ckpt)
    read = _reading(monkeypatch)
    part = load_dit(tiny_ckpt, layers=1)
    assert len(part.blocks) == 1 and part.cfg.num_layers == 1 and whole.cfg.num_layers == 2
    assert read and not any(k.startswith("blocks.1.") for k in read), sorted(read)
    _assert_same(part, whole.state_dict())
    g = torch.Generator().manual_seed(0)
    cfg = whole.cfg
    args = (torch.randn(1, 16, 2, 8, 8, generator=g), torch.tensor([700]), torch.randn(1, cfg.text_len, cfg.text_dim,
            generator=g), torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=g),
            torch.randn(1, cfg.in_dim - 16, 2, 8, 8, generator=g))
    whole.blocks = whole.blocks[:1]
    with torch.no_grad():
        a, b = part(*args), whole(*args)
    assert torch.equal(a, b), f"slice vs cut whole DiT: max abs {(a - b).abs().max():.3g}"
    read.clear()
    blocks = load_dit(tiny_ckpt, blocks_only=True, quant="fp8")
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == 2 and isinstance(blocks[1].ffn[0], FP8Linear)
    assert read and all(k.startswith("blocks.") for k in read), sorted(k for k in read if not k.startswith("blocks."))
    _assert_same(blocks, {k.removeprefix("blocks."): v for k, v in load_dit(tiny_ckpt, quant="fp8").state_dict().items()})
    with pytest.raises(ValueError, match="layers=3: the DiT has 2 blocks"):
        load_dit(tiny_ckpt, layers=3)


def test_bf16_load_keeps_fp32_tables(tiny_ckpt):
    dit = ck.load_dit(tiny_ckpt, torch.bfloat16)
    assert {p.dtype for p in dit.parameters()} == {torch.bfloat16}
    assert all(b.dtype in (torch.float32, torch.int64) for b in dit.buffers()), "RoPE/time tables must stay fp32"
    assert not any(t.is_meta for t in list(dit.parameters()) + list(dit.buffers()))


def test_preset_detection(tiny_ckpt):
    assert ck.preset_for(tiny_ckpt).name == "tiny"


def test_make_tiny_is_deterministic(tmp_path):
    from flf2v.models.make_tiny import write_tiny_checkpoint
    a = write_tiny_checkpoint(tmp_path / "a", seed=3)
    b = write_tiny_checkpoint(tmp_path / "b", seed=3)
    for name in (ck.VAE_FILE, ck.T5_FILE):
        sa, sb = torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_make_tiny_writes_modes_of_the_umask_and_refuses_a_file(tmp_path, capsys, monkeypatch):
    import os
    import stat

    from flf2v.models.make_tiny import main
    old = os.umask(0o022)
    try:
        assert main([str(tmp_path / "ckpt")]) == 0
    finally:
        os.umask(old)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    dirs = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt", *(tmp_path / "ckpt").rglob("*"))
            if p.is_dir()}
    assert modes == {0o644} and dirs == {0o755}, (sorted(map(oct, modes)), sorted(map(oct, dirs)))
    (tmp_path / "ckpt" / "flf2v_cache_calibration.json").write_text("{}")  # the user's: kept on a rewrite
    assert main([str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "flf2v_cache_calibration.json").read_text() == "{}"
    (tmp_path / "photo.jpg").write_bytes(b"jpeg")
    capsys.readouterr()
    assert main([str(tmp_path / "photo.jpg")]) == 2
    err = capsys.readouterr().err.strip()
    assert "photo.jpg is a file" in err and len(err.splitlines()) == 1, err
    assert main([str(tmp_path / "new"), "--frames", str(tmp_path / "photo.jpg")]) == 2  # checked before writing
    err = capsys.readouterr().err.strip()
    assert "--frames" in err and "photo.jpg is a file" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "new").exists()
    monkeypatch.chdir(tmp_path)  # '' wrote into the current folder; --frames '' was dropped; a 2^64 seed was a traceback
    for argv, says in (([""], "the directory argument is an empty string"),
                       (["new", "--frames", ""], "--frames is an empty string"),
                       (["new", "--seed", str(2**64)], f"--seed {2**64} is out of range")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"flf2v-make-tiny: error: {says}") and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "photo.jpg"]


@pytest.mark.parametrize("at", range(1, 6))
def test_a_ctrl_c_while_rewriting_a_checkpoint_loses_none_of_the_users_files(tmp_path, monkeypatch, at):
    """Ctrl-C at the `at`-th rename or link of a rewrite: the user's files are all still in the folder (they were
    moved into the temporary folder one by one, and that folder deleted on the way out)."""
    import os

    from flf2v.models.make_tiny import write_tiny_checkpoint
    dest = write_tiny_checkpoint(tmp_path / "ckpt", seed=1)
    notes = {f"note{i}.txt": f"mine {i}" for i in range(3)}
    for name, text in notes.items():
        (dest / name).write_text(text)
    calls = []

    def interrupting(real):
        def call(*a, **k):
            calls.append(a)
            if len(calls) == at:
                raise KeyboardInterrupt
            return real(*a, **k)
        return call
    for name in ("replace", "link"):
        monkeypatch.setattr(os, name, interrupting(getattr(os, name)))
    with pytest.raises(KeyboardInterrupt):
        write_tiny_checkpoint(dest, seed=1)
    monkeypatch.undo()
    kept = {p.name: p.read_text() for p in dest.glob("note*.txt")}
    assert kept == notes, f"Ctrl-C at rename or link {at}: the user's files left in {dest}: {sorted(kept)}"
    assert (dest / "flf2v_tiny.json").exists(), f"Ctrl-C at rename or link {at}: {dest} holds no checkpoint"


def test_rewriting_a_linked_checkpoint_rewrites_its_folder(tmp_path):
    """A link to a checkpoint folder was replaced by a folder, and the rewrite refused after it had happened."""
    from flf2v.models.make_tiny import write_tiny_checkpoint
    real = write_tiny_checkpoint(tmp_path / "real", seed=1)
    (real / "calibration.json").write_text("mine")
    (tmp_path / "ckpt").symlink_to("real")
    write_tiny_checkpoint(tmp_path / "ckpt", seed=2)
    assert (tmp_path / "ckpt").is_symlink() and (real / "calibration.json").read_text() == "mine"
    assert json.loads((real / "flf2v_tiny.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "real"], "temporary folders left"


# -- damaged checkpoints: one clear error naming the file (and key) ------------------------------------

def _shard(ckpt, i=1):
    return ckpt / f"diffusion_pytorch_model-{i:05d}-of-00003.safetensors"


@pytest.mark.parametrize("case", ["missing_t5", "missing_config", "missing_shard", "truncated_shard",
                                  "wrong_shape", "missing_key", "unexpected_key", "truncated_pth",
                                  "no_tokenizer", "two_dits", "empty_index"])
def test_damaged_checkpoint(tiny_ckpt, tmp_path, case):
    c = copy_ckpt(tiny_ckpt, tmp_path / "c")
    load = ck.load_dit
    if case == "missing_t5":
        os.remove(c / ck.T5_FILE); load, match = ck.load_t5, ck.T5_FILE
    elif case == "missing_config":
        os.remove(c / ck.DIT_CONFIG); match = "config.json"
    elif case == "missing_shard":
        os.remove(_shard(c, 2)); match = "shard .*00002-of-00003.safetensors is listed but missing from .*; re-download it"
    elif case == "truncated_shard":
        data = _shard(c).read_bytes(); _shard(c).write_bytes(data[: len(data) // 2])
        match = "00001-of-00003.safetensors"
    elif case in ("wrong_shape", "missing_key", "unexpected_key"):
        sd = load_file(_shard(c))
        key = sorted(sd)[0]
        if case == "wrong_shape":
            sd[key] = torch.zeros(3, 3); match = f"{key}.*shape"
        elif case == "missing_key":
            del sd[key]; match = "index lists"
        else:
            sd["blocks.99.extra.weight"] = torch.zeros(2)
            index = json.loads((c / ck.DIT_INDEX).read_text())
            index["weight_map"]["blocks.99.extra.weight"] = _shard(c).name
            (c / ck.DIT_INDEX).write_text(json.dumps(index)); match = "unexpected key 'blocks.99.extra.weight'"
        save_file(sd, _shard(c))
    elif case == "truncated_pth":
        data = (c / ck.VAE_FILE).read_bytes(); (c / ck.VAE_FILE).write_bytes(data[: len(data) // 3])
        load, match = ck.load_vae, ck.VAE_FILE
    elif case == "no_tokenizer":
        shutil.rmtree(c / ck.T5_TOKENIZER); load, match = ck.load_tokenizer, "umt5-xxl"
    elif case == "two_dits":  # a merged copy beside the shards (a half-done re-download?) was ignored silently
        shutil.copy(_shard(c), c / ck.DIT_SINGLE); match = "holds two DiTs, diffusion_pytorch_model.safetensors and"
    elif case == "empty_index":  # beside a single file it was "two DiTs"; alone, "shard ... is listed but missing"
        (c / ck.DIT_INDEX).write_text('{"weight_map": {}}'); match = "not a safetensors index with a weight_map"
    with pytest.raises(ck.CheckpointError, match=match) as e:
        load(c)
    assert "\n" not in str(e.value)


def test_pth_cut_anywhere_or_a_folder_is_one_line_naming_the_file(tiny_ckpt, tmp_path):
    """torch.load(mmap=True) reports a cut .pth as RuntimeError or, cut elsewhere, as OSError (EINVAL from the
    mmap): both are the file's damage, as is a folder where the file should be."""
    c = copy_ckpt(tiny_ckpt, tmp_path / "c")
    data = (c / ck.T5_FILE).read_bytes()
    for cut in (1, 2, 3, 4, 5, 6, 7):
        (c / ck.T5_FILE).write_bytes(data[: len(data) * cut // 8])
        with pytest.raises(ck.CheckpointError, match=f"{ck.T5_FILE}: unreadable checkpoint .*; re-download it") as e:
            ck.load_t5(c)
        assert "\n" not in str(e.value) and len(str(e.value)) < 300, (cut, str(e.value))
    (c / ck.T5_FILE).unlink()
    (c / ck.T5_FILE).mkdir()
    with pytest.raises(ck.CheckpointError, match=f"{ck.T5_FILE}: a folder, not a file"):
        ck.load_t5(c)


def test_an_official_dit_that_disagrees_with_its_config_is_said_before_anything_loads(tiny_ckpt, tmp_path):
    c = copy_ckpt(tiny_ckpt, tmp_path / "c")
    config = json.loads((c / ck.DIT_CONFIG).read_text())
    (c / ck.DIT_CONFIG).write_text(json.dumps({**config, "model_type": "i2v"}))  # beside FLF2V weights
    with pytest.raises(ck.CheckpointError, match=r"unexpected key 'img_emb.emb_pos'.*config.json describes an I2V"):
        ck.check_files(c)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_malicious_pth_is_refused(tiny_ckpt, tmp_path, monkeypatch):
    c = copy_ckpt(tiny_ckpt, tmp_path / "c")
    monkeypatch.chdir(tmp_path)
    sd = torch.load(c / ck.VAE_FILE, weights_only=True)
    sd["evil"] = _Payload()
    with open(c / ck.VAE_FILE, "wb") as f:
        torch.save(sd, f, pickle_module=pickle)
    with pytest.raises(ck.CheckpointError, match="refused"):
        ck.load_vae(c)
    assert not (tmp_path / "pwned_by_pickle").exists(), "the pickle payload ran"


def test_preset_unknown_dims(tiny_ckpt, tmp_path):
    c = copy_ckpt(tiny_ckpt, tmp_path / "c")
    cfg = json.loads((c / ck.DIT_CONFIG).read_text()); cfg["dim"] = 96
    (c / ck.DIT_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ck.CheckpointError, match="no preset has dim=96"):
        ck.preset_for(c)


@pytest.mark.parametrize("key,value,says", [
    ("num_heads", 0, "num_heads must be a positive integer, got 0"),  # was a ZeroDivisionError traceback
    ("num_heads", None, "num_heads must be a positive integer, got null"),
    ("num_layers", "2", "num_layers must be a positive integer, got '2'"),  # was "no preset has num_layers=2"
    ("num_heads", -2, "num_heads must be a positive integer, got -2"),
    ("patch_size", None, "patch_size must be a list of 3 positive integers, got null"),  # TypeError deep inside
    ("patch_size", {}, "patch_size must be a list of 3 positive integers, got {}"),
    ("eps", "1e-6", "eps must be a positive number, got '1e-6'"),
    ("model_type", 3, "model_type must be a string, got 3"),
])
def test_config_json_values_of_the_wrong_kind_are_one_line(tiny_ckpt, tmp_path, key, value, says):
    bad = shutil.copytree(tiny_ckpt, tmp_path / "bad")
    cfg = json.loads((bad / ck.DIT_CONFIG).read_text())
    (bad / ck.DIT_CONFIG).write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ck.CheckpointError) as e:
        ck.preset_for(bad)
    assert str(e.value) == f"{bad / ck.DIT_CONFIG}: {says}; the file is damaged or edited: download it again"


def test_real_config_json_maps_to_14b():
    real = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 5120, "eps": 1e-06,
            "ffn_dim": 13824, "freq_dim": 256, "in_dim": 36, "model_type": "flf2v", "num_heads": 40,
            "num_layers": 40, "out_dim": 16, "text_len": 512}
    from flf2v.models.config import DiTConfig
    cfg = DiTConfig.from_json_dict(real)
    assert cfg == get_preset("flf2v-14B").dit
    assert (cfg.head_dim, cfg.rope_split, cfg.clip_tokens) == (128, (22, 21, 21), 514)
