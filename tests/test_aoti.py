"""AOTInductor engines (`flf2v-build --backend aoti`, runtime/aoti_backend.py) on the CPU: every package
against the reference networks, the video end to end against the torch backend, a dynamic DiT package at
two grids, the CLI, and damaged or foreign packages refused in one line."""
import json
import shutil

import pytest
import torch
from conftest import rel_err
from helpers import _args, reference, run

from flf2v.export import contracts as C
from flf2v.export import manifest as M
from flf2v.export.build import BuildError, build
from flf2v.models import checkpoint as ck
from flf2v.models.config import get_preset
from flf2v.runtime.backends import open_backend
from flf2v.runtime.pipeline import Pipeline

PRESET = get_preset("tiny")
TOL = 1e-4  # the fp32 engine tolerance
KW = dict(size="64*64", frame_num=9, seed=3, sample_steps=3, progress=False)


@pytest.fixture(scope="module")
def nets(tiny_ckpt):
    return {c: ck.load(tiny_ckpt, c, torch.float32, PRESET) for c in ("t5", "clip", "dit", "vae")}


def test_folder_is_tagged_for_this_machine(tiny_aoti_engines):
    m = json.loads((tiny_aoti_engines / M.MANIFEST).read_text())
    version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert m["backend"] == "aoti" and m["target"] == f"cpu-aoti-torch{version}"
    assert sorted(m["engines"]) == sorted(["t5", "clip", "dit_b2", "dit_cached_b2", *C.VAE_GRAPHS])
    assert all(e["file"].endswith(".pt2") and e["builder"]["device"] == "cpu" for e in m["engines"].values())


def test_every_package_equals_its_network(tiny_aoti_engines, tiny_ckpt, nets):
    backend = open_backend("aoti", tiny_aoti_engines, tiny_ckpt, PRESET, "cpu")
    for g in C.graphs(PRESET, C.get_shape(PRESET, "tiny"), "fp32", cfg_batch=(2,)):
        inputs = C.sample_inputs(g, seed=1)
        got = backend._run(g.name, inputs)
        want = reference(nets, g, inputs)
        assert len(got) == len(want) == len(g.outputs), g.name
        for spec, a, b in zip(g.outputs, got, want):
            err, rel = rel_err(a, b)
            print(f"{g.name}.{spec.name}: max abs {err:.2e}, rel {rel:.2e}")
            assert rel < TOL, f"{g.name}.{spec.name} AOTI vs torch: max abs {err:.2e}, rel {rel:.2e}"


def test_video_equals_the_torch_backend(tiny_aoti_engines, pipe, frames):
    want = pipe.generate("a red ball", *frames, **KW)
    aoti = Pipeline.from_engines(tiny_aoti_engines)
    assert aoti.backend.name == "aoti" and aoti.device.type == "cpu"
    got = aoti.generate("a red ball", *frames, **KW)
    err, rel = rel_err(got, want)
    print(f"AOTI vs torch video: max abs {err:.2e}, rel {rel:.2e}")
    assert rel < TOL, f"AOTI vs torch video: max abs {err:.2e}, rel {rel:.2e}"


def test_dynamic_dit_package_at_two_grids(tiny_ckpt, nets, tmp_path):
    """The dynamic build's DiT (only it: a dynamic VAE package compiles ~50 s each here) at a landscape and
    a portrait grid of the tiny `dynamic` shape's two profiles."""
    shape = C.get_shape(PRESET, None)
    folder = build(tiny_ckpt, None, "fp32", out=tmp_path / "dynamic", backend="aoti", cfg_batch=(2,),
                   only=["dit_b2"], progress=False)
    m = json.loads((folder / M.MANIFEST).read_text())
    assert m["engines"]["dit_b2"]["inputs"][0]["shape"] == [2, 16, "T", "2*hp", "2*wp"]
    g = C.get_graph(PRESET, shape, "fp32", "dit_b2")
    model = torch._inductor.aoti_load_package(str(folder / "dit_b2.pt2"))
    for dims in ({"T": 3, "hp": 2, "wp": 5}, {"T": 5, "hp": 6, "wp": 3}):
        assert any(p.holds(tuple(dims.values())) for p in shape.profiles)
        inputs = C.sample_inputs(g.at(dims), seed=2)
        for spec, a, b in zip(g.outputs, model(*inputs), reference(nets, g, inputs)):
            err, rel = rel_err(a, b)
            assert rel < TOL, f"dynamic dit_b2.{spec.name} at {dims}: max abs {err:.2e}, rel {rel:.2e}"


def test_cli_runs_aoti_engines(tiny_aoti_engines, tiny_ckpt, demo_frames, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    args = [a for a in _args(tiny_ckpt, demo_frames, out, "--engines", str(tiny_aoti_engines)) if a != "torch"]
    args[args.index("--frame_num") + 1] = "9"
    args.remove("--backend")  # auto: the folder's own kind
    assert run(args) == 0 and out.exists()
    assert "flf2v-run: backend aoti" in capsys.readouterr().out


def _copy(folder, tmp_path):
    dst = tmp_path / "engines"
    shutil.copytree(folder, dst)
    return dst


def test_damaged_package_is_refused_in_one_line(tiny_aoti_engines, tiny_ckpt, demo_frames, tmp_path, capsys):
    folder = _copy(tiny_aoti_engines, tmp_path)
    pkg = folder / "t5.pt2"
    data = bytearray(pkg.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)  # same size: only loading it can tell
    pkg.write_bytes(bytes(data))
    out = tmp_path / "v.mp4"
    args = _args(tiny_ckpt, demo_frames, out, "--engines", str(folder))
    args[args.index("--backend") + 1] = "aoti"
    args[args.index("--frame_num") + 1] = "9"
    assert run(args) == 2
    err = capsys.readouterr().err.strip()
    assert "t5.pt2: not a loadable AOTInductor package" in err and "--backend aoti" in err, err
    assert "\n" not in err and not out.exists()


def test_foreign_package_is_refused_with_the_rebuild_command(tiny_aoti_engines, tiny_ckpt, tmp_path):
    folder = _copy(tiny_aoti_engines, tmp_path)
    m = json.loads((folder / M.MANIFEST).read_text())
    m["target"] = "h100-sm90-aoti-torch2.12"
    (folder / M.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(M.EngineError, match=r"built for h100-sm90-aoti-torch2.12, this machine is cpu-aoti-torch"
                                            r".*flf2v-build .*--backend aoti"):
        Pipeline.from_engines(folder)


def test_bf16_on_the_cpu_is_refused(tiny_ckpt, tmp_path):
    with pytest.raises(BuildError, match="AOTInductor packages on the CPU are fp32"):
        build(tiny_ckpt, "tiny", "bf16", out=tmp_path / "x", backend="aoti", progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the plugin build is allowed (gpu-check part 7)")
def test_plugin_attention_needs_a_gpu(tiny_ckpt, tmp_path):
    with pytest.raises(BuildError, match="compiles the Triton kernels into the packages, which needs a CUDA GPU"):
        build(tiny_ckpt, "tiny", "fp32", out=tmp_path / "x", backend="aoti", attention="plugin", progress=False)
    assert not (tmp_path / "x").exists()


def test_triton_attention_exports_as_one_triton_op_per_call():
    """The DiT with the fused Triton kernels (attention="triton") under torch.export: each attention call stays
    one flf2v op node (what the ONNX plugin export translates), the exported program equals the sdpa DiT,
    and the ops are triton_ops, whose rule under functionalization (AOTInductor's and torch.compile's
    tracing) traces the body into the kernels' launches. That compilation needs compiled (CUDA) kernels:
    make gpu-check part 7 checks the package holds them."""
    from test_dit import TINY, make_inputs, randomize

    from flf2v.export.contracts import DiTFull
    from flf2v.models.dit import WanDiT
    sdpa = randomize(WanDiT(TINY), seed=21).eval()
    fused = WanDiT(TINY, attention="triton").eval()
    fused.load_state_dict(sdpa.state_dict())
    x, t, ctx, clip, y = make_inputs(TINY, 1, 2, 4, 6, seed=22)
    with torch.no_grad():
        ep = torch.export.export(DiTFull(fused).eval(), (x, t, ctx, clip, y))
        got, want = ep.module()(x, t, ctx, clip, y)[0], sdpa(x, t, ctx, clip, y)
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "flf2v" in str(n.target)]
    assert sorted(set(ops)) == ["flf2v.wan_cross_attention.default", "flf2v.wan_self_attention.default"], ops
    assert len(ops) == 2 * TINY.num_layers, ops
    err, rel = rel_err(got, want)
    assert rel < 2e-6, f"exported triton DiT vs sdpa: max abs {err:.2e}, rel {rel:.2e}"
    from torch._library.custom_ops import OPDEFS
    from torch._subclasses.functional_tensor import FunctionalTensorMode
    for name in ("flf2v::wan_self_attention", "flf2v::wan_cross_attention"):
        assert FunctionalTensorMode in OPDEFS[name]._torch_dispatch_fns, f"{name} is not a triton_op"


def test_packages_load_for_capture_and_leave_after_the_loop(tiny_aoti_engines, tiny_ckpt, monkeypatch):
    """What a CUDA-graph capture needs of the backend, on the CPU: packages loaded single-threaded (the default
    container queries CUDA events per run, illegal while capturing), a graph token naming the loaded DiT
    package (a reload must recapture), and the DiT released after the loop (before VAE decode)."""
    backend = open_backend("aoti", tiny_aoti_engines, tiny_ckpt, PRESET, "cpu")
    real, seen = torch._inductor.aoti_load_package, []

    def load(path, run_single_threaded=False, device_index=-1):
        seen.append(run_single_threaded)
        return real(path, run_single_threaded=run_single_threaded, device_index=device_index)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", load)
    backend.capturable = True  # as on CUDA
    assert backend.graph_token(2) is None
    backend.model("dit_b2")
    first = backend.graph_token(2)
    assert first is not None and seen == [True], (first, seen)
    backend.finish_denoise()
    assert not [g for g in backend.models if g.startswith("dit_")], list(backend.models)
    backend.model("dit_b2")
    assert backend.graph_token(2) not in (None, first)


# ---- STREAM=1: the DiT step as embed, block and head packages, the blocks' weights streamed -------------------

@pytest.fixture(scope="module")
def streamed_engines(tiny_aoti_engines, tiny_ckpt, tmp_path_factory):
    """The tiny folder with its DiT step rebuilt for weight streaming (three compiles, ~50 s); the other
    packages are the whole folder's and stay current (only the DiT's key holds the streaming option)."""
    folder = tmp_path_factory.mktemp("aoti-stream") / "tiny"
    shutil.copytree(tiny_aoti_engines, folder)
    return build(tiny_ckpt, "tiny", "fp32", out=folder, backend="aoti", cfg_batch=(2,), only=["dit_b2"],
                 weight_streaming=True, force=True, progress=False)


def test_streamed_dit_step_equals_the_network_whatever_the_blocks_resident(streamed_engines, tiny_ckpt, nets):
    """The composed step (embed, each block's weights into the one block package, head) against the reference
    DiT; all blocks resident, one, or none (each streamed block copied into a slot once per call) give the same
    bits: the same packages on the same weight values."""
    m = json.loads((streamed_engines / M.MANIFEST).read_text())
    parts = m["engines"]["dit_b2"]["parts"]
    assert m["weight_streaming"] and sorted(parts) == ["block", "embed", "head"], m["engines"]["dit_b2"]
    assert all((streamed_engines / f).is_file() for f in parts.values()) and "t5" in m["engines"]
    g = C.get_graph(PRESET, C.get_shape(PRESET, "tiny"), "fp32", "dit_b2")
    inputs = C.sample_inputs(g, seed=1)
    want, outs = reference(nets, g, inputs), {}
    for resident in (None, 1, 0):
        backend = open_backend("aoti", streamed_engines, tiny_ckpt, PRESET, "cpu", resident_blocks=resident)
        outs[resident] = backend._run("dit_b2", inputs)
        if resident is not None:
            assert backend.blocks.copies == PRESET.dit.num_layers - resident, (resident, backend.blocks.copies)
    for resident, got in outs.items():
        for spec, a, b in zip(g.outputs, got, want):
            err, rel = rel_err(a, b)
            assert rel < TOL, f"streamed dit_b2.{spec.name}, {resident} resident: max abs {err:.2e}, rel {rel:.2e}"
        diff = max((a - b).abs().max().item() for a, b in zip(got, outs[None]))
        assert diff == 0, f"{resident} blocks resident vs all: max abs {diff:.3g} (fp32: the same math)"


def test_cli_streams_aoti_blocks_as_planned(streamed_engines, tiny_aoti_engines, tiny_ckpt, demo_frames, tmp_path,
                                            monkeypatch, capsys):
    """--offload blocks:1 on a STREAM=1 aoti folder: the backend opens with the plan's one resident block (the
    video alone could not tell: streaming changes no bit), recorded in --metrics, and the video is the
    all-resident one; a folder without streaming refuses it in one line."""
    from helpers import saved_videos

    from flf2v.runtime import backends as B
    saved, opened, real_open = saved_videos(monkeypatch), [], B.open_backend
    monkeypatch.setattr(B, "open_backend", lambda *a, **options: opened.append(options) or real_open(*a, **options))

    def args(folder, out, *extra):
        a = [x for x in _args(tiny_ckpt, demo_frames, out, "--engines", str(folder), *extra) if x != "torch"]
        a[a.index("--frame_num") + 1] = "9"
        a.remove("--backend")
        return a
    ref, out, metrics = tmp_path / "ref.mp4", tmp_path / "s.mp4", tmp_path / "m.json"
    assert run(args(streamed_engines, ref)) == 0
    assert run(args(streamed_engines, out, "--offload", "blocks:1", "--metrics", str(metrics))) == 0
    plan = json.loads(metrics.read_text())["memory_plan"]
    assert plan["blocks"] == 1 and plan["offload_model"], plan
    assert [o.get("resident_blocks") for o in opened] == [None, 1], opened
    a, b = saved[str(ref)], saved[str(out)]
    assert torch.equal(a, b), f"max abs {(a - b).abs().max().item():.3g}"
    capsys.readouterr()
    assert run(args(tiny_aoti_engines, tmp_path / "x.mp4", "--offload", "blocks:1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--weight_streaming" in err[0], err
    assert not (tmp_path / "x.mp4").exists()
