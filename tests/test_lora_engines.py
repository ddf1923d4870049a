"""LoRAs on engines (issue 14): engines built with a LoRA match the torch backend with it; ONNX Runtime swaps
LoRAs at run time (equal to a fresh build with the run's LoRAs, the base restored exactly when removed);
TensorRT folders built with other LoRAs are refused with the build command."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from flf2v.export import manifest as M
from flf2v.export.build import build
from flf2v.models import checkpoint as ck
from flf2v.models.lora import load_loras
from flf2v.runtime import trt_backend
from flf2v.runtime.media import load_image
from flf2v.runtime.pipeline import Pipeline

KW = dict(size="64*64", frame_num=9, sample_steps=2, seed=4, progress=False)


def write_lora(path, ckpt_dir, rank=2, seed=0, targets=("self_attn.q", "cross_attn.v", "ffn.2")):
    """A LoRA in the official key layout (lora_A / lora_B) over some linears of every block, large enough
    to change the video visibly."""
    cfg = ck.read_dit_config(ckpt_dir)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(cfg.num_layers):
        for t in targets:
            out_dim, in_dim = (cfg.dim, cfg.ffn_dim) if t == "ffn.2" else (cfg.dim, cfg.dim)
            sd[f"diffusion_model.blocks.{i}.{t}.lora_A.weight"] = torch.randn(rank, in_dim, generator=gen) * 0.3
            sd[f"diffusion_model.blocks.{i}.{t}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.3
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def lora_file(tiny_ckpt, tmp_path_factory):
    return write_lora(tmp_path_factory.mktemp("lora") / "style.safetensors", tiny_ckpt)


@pytest.fixture(scope="module")
def lora_engines(tiny_ckpt, lora_file, tmp_path_factory):
    """Static tiny ORT engines with the LoRA merged at scale 0.8."""
    return build(tiny_ckpt, "tiny", "fp32", out=tmp_path_factory.mktemp("lora-engines") / "tiny", backend="ort",
                 cfg_batch=(2,), progress=False, loras=[f"{lora_file}:0.8"])


def video(pipe, demo_frames):
    first, last = (load_image(p) for p in demo_frames)
    return pipe.generate("a red ball", first, last, **KW)


def test_manifest_records_the_lora(lora_engines, lora_file):
    m = json.loads((lora_engines / M.MANIFEST).read_text())
    assert [(e["path"], e["scale"]) for e in m["loras"]] == [(str(lora_file), 0.8)]
    assert len(m["loras"][0]["fingerprint"]) == 32 and m["engines"]["dit_b2"]["loras"] == m["loras"]
    assert "loras" not in m["engines"]["vae_decode_chunk"]


def test_engines_with_a_lora_match_torch_with_it(tiny_ckpt, lora_engines, lora_file, demo_frames):
    loras = [(str(lora_file), 0.8)]
    ref = video(Pipeline.from_checkpoint(tiny_ckpt, loras=loras), demo_frames)
    base = video(Pipeline.from_checkpoint(tiny_ckpt), demo_frames)
    out = video(Pipeline.from_engines(lora_engines, loras=loras), demo_frames)
    err = (out - ref).abs().max().item()
    # the LoRA changes the video (else this test could not fail), the engines follow it (tolerance: the
    # static engines' 1e-4, test_runtime.py)
    assert (ref - base).abs().max().item() > 1e-2 and err < 1e-4, f"LoRA engines vs torch+LoRA: max abs {err:.2e}"


def test_ort_swap_equals_a_fresh_build_and_removing_restores_the_base(tiny_engines, lora_engines, lora_file,
                                                                     demo_frames):
    loras = [(str(lora_file), 0.8)]
    fresh = video(Pipeline.from_engines(lora_engines, loras=loras), demo_frames)
    swapped = video(Pipeline.from_engines(tiny_engines, loras=loras), demo_frames)  # base build + swap
    err = (swapped - fresh).abs().max().item()
    assert err < 1e-6, f"swapped-in LoRA vs a build with it: max abs {err:.2e}"
    base = video(Pipeline.from_engines(tiny_engines), demo_frames)
    removed = video(Pipeline.from_engines(lora_engines), demo_frames)  # LoRA build, run without it
    assert torch.equal(removed, base), f"removed LoRA vs base: max abs {(removed - base).abs().max().item():.2e}"
    rescaled = video(Pipeline.from_engines(lora_engines, loras=[(str(lora_file), 0.4)]), demo_frames)
    assert (rescaled - fresh).abs().max().item() > 1e-3  # another scale is another model


def test_trt_folder_with_other_loras_is_refused(tiny_ckpt, lora_engines, lora_file, tmp_path, monkeypatch):
    monkeypatch.setattr(M, "target_tag", lambda backend: "fake-sm90-trt11.4")
    folder = shutil.copytree(lora_engines, tmp_path / "tiny")
    m = json.loads((folder / M.MANIFEST).read_text())
    m.update(backend="trt", target="fake-sm90-trt11.4")
    (folder / M.MANIFEST).write_text(json.dumps(m))
    preset = ck.preset_for(tiny_ckpt)
    with pytest.raises(M.EngineError) as e:
        trt_backend.TrtBackend(folder, tiny_ckpt, preset, "cpu")  # run without the LoRA it was built with
    msg = str(e.value)
    assert "built with LoRAs style.safetensors:0.8" in msg and "cannot swap" in msg and "\n" not in msg, msg
    other = load_loras([(str(lora_file), 0.5)], tiny_ckpt)
    with pytest.raises(M.EngineError, match=f'--lora {lora_file}:0.5'):
        trt_backend.TrtBackend(folder, tiny_ckpt, preset, "cpu", loras=other)


@pytest.mark.parametrize("make, message", [
    (lambda d, lora: f"{lora}:abc", "not a finite number"),
    (lambda d, lora: str(d / "missing.safetensors"), "missing.safetensors"),
    (lambda d, lora: (d / "damaged.safetensors").write_bytes(b"\x10\x00\x00\x00junk") and str(d / "damaged.safetensors"),
     "damaged.safetensors"),
])
def test_bad_lora_exits_2_with_one_line(tiny_ckpt, lora_file, demo_frames, tmp_path, capsys, make, message):
    """flf2v-run and flf2v-build: a bad --lora is one line, exit 2, no video and no engines."""
    from flf2v.export.build import main as build_main
    from flf2v.runtime.cli import main as run_main
    arg = make(tmp_path, lora_file)
    out = tmp_path / "v.mp4"
    assert run_main(["--ckpt_dir", str(tiny_ckpt), "--first_frame", str(demo_frames[0]), "--last_frame",
                     str(demo_frames[1]), "--prompt", "x", "--backend", "torch", "--lora", arg,
                     "--save_file", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists(), err
    assert build_main(["--ckpt_dir", str(tiny_ckpt), "--preset", "tiny", "--out", str(tmp_path / "e"),
                       "--lora", arg, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "e" / M.MANIFEST).exists(), err


def test_metrics_record_the_loras(tiny_ckpt, lora_file, demo_frames, tmp_path):
    """--metrics said every value of the run but its LoRAs (only the raw --lora strings, under "args")."""
    import hashlib
    import json

    from flf2v.runtime.cli import main as run_main
    metrics = tmp_path / "m.json"
    assert run_main(["--ckpt_dir", str(tiny_ckpt), "--first_frame", str(demo_frames[0]), "--last_frame",
                     str(demo_frames[1]), "--prompt", "x", "--backend", "torch", "--lora", f"{lora_file}:0.5",
                     "--frame_num", "5", "--sample_steps", "1", "--save_file", str(tmp_path / "v.mp4"),
                     "--metrics", str(metrics), "--quiet"]) == 0
    sha = hashlib.sha256(lora_file.read_bytes()).hexdigest()
    assert json.loads(metrics.read_text())["loras"] == [{"path": str(lora_file), "fingerprint": sha[:32],
                                                         "scale": 0.5}]


def test_lora_for_another_model_exits_2(tiny_ckpt, demo_frames, tmp_path, capsys):
    from flf2v.runtime.cli import main as run_main
    bad = tmp_path / "wide.safetensors"
    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 48),
               "blocks.0.self_attn.q.lora_B.weight": torch.zeros(48, 2)}, str(bad))
    assert run_main(["--ckpt_dir", str(tiny_ckpt), "--first_frame", str(demo_frames[0]), "--last_frame",
                     str(demo_frames[1]), "--prompt", "x", "--backend", "torch", "--lora", str(bad),
                     "--save_file", str(tmp_path / "v.mp4"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "another model size" in err and err.count("\n") == 1, err
