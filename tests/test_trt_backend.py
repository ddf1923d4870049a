"""TrtBackend's logic on a CPU: buffers bound once and reused, VAE caches ping-ponged between two sets, the
engines' I/O checked against the manifest, the DiT released before decoding; dynamic engines set to each
shape's optimization profile and input shapes, their buffers kept per shape. The TensorRT engines are
stood in for by the tiny fp32 ONNX graphs (ONNX Runtime executes whatever tensors are bound by address,
the way an execution context does), so a video through this backend must equal the ORT backend's."""
from types import SimpleNamespace

import pytest
import torch
from conftest import rel_err

from flf2v.export import manifest as M
from flf2v.models import checkpoint as ck
from flf2v.runtime import engine_folders, ort_backend, trt_backend
from flf2v.runtime.media import load_image
from PIL import Image
from flf2v.runtime.pipeline import Pipeline
from helpers import FakeTrtBackend, relabel


@pytest.fixture(scope="module")
def trt_folder(tiny_engines, tmp_path_factory):
    return relabel(tiny_engines, tmp_path_factory)


@pytest.fixture()
def backends(trt_folder, tiny_engines, tiny_ckpt, monkeypatch):
    monkeypatch.setattr(M, "target_tag", lambda backend: "fake-sm90-trt11.4")
    preset = ck.preset_for(tiny_ckpt)
    ort = ort_backend.OrtBackend(tiny_engines, tiny_ckpt, preset)
    return FakeTrtBackend(trt_folder, tiny_ckpt, preset, ort), ort, preset


def run(backend, preset, tiny_ckpt, demo_frames, cfg_batch):
    pipe = Pipeline(backend, ck.load_tokenizer(tiny_ckpt, preset), preset)
    first, last = (load_image(p) for p in demo_frames)
    return pipe.generate("a red ball", first, last, sample_steps=3, seed=7, cfg_batch=cfg_batch, progress=False)


@pytest.mark.parametrize("cfg_batch", [1, 2])
def test_video_equals_ort_backend(backends, tiny_ckpt, demo_frames, cfg_batch):
    """Reused output buffers and ping-ponged caches give exactly the ORT backend's video."""
    trt, ort, preset = backends
    video = run(trt, preset, tiny_ckpt, demo_frames, cfg_batch)
    ref = run(ort, preset, tiny_ckpt, demo_frames, cfg_batch)
    err, rel = rel_err(video, ref)
    assert err == 0.0, f"cfg_batch={cfg_batch}: TensorRT-style buffers vs ORT: max abs {err:.2e}, rel {rel:.2e}"


def test_stages_release_each_other_and_two_cache_sets(backends, tiny_ckpt, demo_frames):
    """Two runs: the DiT is never loaded with the decoder or an encoder (not even the previous run's)."""
    trt, _, preset = backends
    run(trt, preset, tiny_ckpt, demo_frames, 2)
    n_caches = sum(s["name"].startswith("cache_in.") for s in trt.specs["vae_decode_first"]["inputs"])
    a, b = trt.cache_sets["decode"]
    assert len(a) == len(b) == n_caches
    for g in ("vae_decode_first", "vae_decode_chunk"):  # no per-engine cache buffers beside the two sets
        bufs = trt.engines[g].shapes[trt.engines[g].bound][1]
        assert not any(n.startswith("cache_") for n in bufs), sorted(bufs)
    run(trt, preset, tiny_ckpt, demo_frames, 2)
    dit = [loaded for g, loaded in trt.executed if g.startswith("dit_b")]
    assert dit and all(loaded == ["dit_b2"] for loaded in dit), f"loaded beside the DiT: {dit[-1]}"
    decode = [loaded for g, loaded in trt.executed if g.startswith("vae_decode")]
    assert decode and all(not any(n.startswith("dit_b") for n in loaded) for loaded in decode), decode[0]
    assert set(trt.cache_sets) == {"decode"}, f"encoder caches kept after encoding: {set(trt.cache_sets)}"


def test_engine_io_mismatch_is_refused(backends):
    trt, _, _ = backends
    engine = trt._deserialize("clip")
    trt.check_io("clip", engine)  # the real thing passes
    real = engine.io[0]
    engine.io[0] = ({**real[0], "shape": [-1, *real[0]["shape"][1:]]}, "in")  # as TensorRT may report a dim
    trt.check_io("clip", engine)
    engine.io[0] = ({**engine.io[0][0], "shape": [9, 3, 8, 8]}, "in")
    with pytest.raises(engine_folders.EngineError, match=r"I/O differs from the manifest.*flf2v-build"):
        trt.check_io("clip", engine)
    engine.io[0] = ({**engine.io[0][0], "dtype": "bfloat16", "shape": trt.specs["clip"]["inputs"][0]["shape"]},
                    "in")
    with pytest.raises(engine_folders.EngineError, match="I/O differs"):
        trt.check_io("clip", engine)


def test_failed_deserialization_is_one_line(backends, monkeypatch, tmp_path):
    trt, _, _ = backends
    trt.runtime = SimpleNamespace(deserialize_cuda_engine=lambda plan: None)
    monkeypatch.setattr(trt, "_deserialize", lambda g: trt_backend.TrtBackend._deserialize(trt, g))
    with pytest.raises(engine_folders.EngineError, match=r"could not deserialize.*flf2v-build") as e:
        trt._load("clip")
    assert "\n" not in str(e.value)


def test_plan_is_memory_mapped_not_read(backends, monkeypatch):
    """deserialize_cuda_engine gets a buffer over the file (a 33 GB plan is never copied to host RAM)."""
    trt, _, _ = backends
    seen = {}

    def deserialize(plan):
        seen["type"], seen["head"] = type(plan).__name__, bytes(memoryview(plan)[:4])
        return trt._deserialize_fake("clip")

    trt._deserialize_fake = FakeTrtBackend._deserialize.__get__(trt)
    trt.runtime = SimpleNamespace(deserialize_cuda_engine=deserialize)
    trt_backend.TrtBackend._deserialize(trt, "clip")
    assert seen["type"] == "mmap", seen
    assert seen["head"] == (trt.folder / trt.specs["clip"]["file"]).read_bytes()[:4]


# ---- dynamic engines ---------------------------------------------------------------------------------

def frame_of(tmp_path, w, h):
    path = tmp_path / f"{w}x{h}.png"
    Image.new("RGB", (w, h), (w % 256, h % 256, 90)).save(path)
    return load_image(path)


def test_dynamic_engines_switch_profiles_and_shapes(tiny_dynamic_engines, tiny_ckpt, demo_frames, monkeypatch,
                                                    tmp_path_factory, tmp_path):
    """Landscape, portrait, landscape: each run sets the DiT's context to its profile and shapes, the
    buffers of both shapes are kept, and every video equals the ORT backend's."""
    monkeypatch.setattr(M, "target_tag", lambda backend: "fake-sm90-trt11.4")
    preset = ck.preset_for(tiny_ckpt)
    ort = ort_backend.OrtBackend(tiny_dynamic_engines, tiny_ckpt, preset)
    trt = FakeTrtBackend(relabel(tiny_dynamic_engines, tmp_path_factory), tiny_ckpt, preset, ort)
    trt.keep_dit = True
    tok = ck.load_tokenizer(tiny_ckpt, preset)
    last = load_image(demo_frames[1])
    kw = dict(sample_steps=2, seed=3, progress=False)
    tokens = []
    for w, h in ((640, 360), (360, 640), (640, 360)):
        first = frame_of(tmp_path, w, h)
        video = Pipeline(trt, tok, preset).generate("x", first, last, **kw)
        ref = Pipeline(ort, tok, preset).generate("x", first, last, **kw)
        err, rel = rel_err(video, ref)
        assert err == 0.0, f"{w}x{h}: TensorRT-style dynamic buffers vs ORT: max abs {err:.2e}, rel {rel:.2e}"
        tokens.append(trt.graph_token(2))
    profiles = [c[2] for c in trt.calls if c[0] == "profile" and c[1] == "dit_b2"]
    assert profiles == [0, 1, 0], profiles  # 80x48 landscape, 48x80 portrait, back
    x_shapes = [c[3] for c in trt.calls if c[:3] == ("shape", "dit_b2", "x")]
    assert x_shapes == [(2, 16, 3, 6, 10), (2, 16, 3, 10, 6), (2, 16, 3, 6, 10)], x_shapes
    assert len(trt.engines["dit_b2"].shapes) == 2  # both shapes' buffers kept (KEEP_SHAPES)
    assert tokens[0] == tokens[2] != tokens[1], tokens  # back at a kept shape: its captured graph stays valid


def test_profile_switch_is_ordered_on_both_streams(monkeypatch):
    """The switch runs on the backend's stream after the caller's queued work, and the caller's stream (where
    a captured graph replays) waits for it."""
    order = []

    class Stream(SimpleNamespace):
        def wait_stream(self, other):
            order.append(f"{self.name} waits {other.name}")
    caller, own = Stream(name="caller", cuda_stream=1), Stream(name="backend", cuda_stream=2)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    backend = SimpleNamespace(device=torch.device("cuda"), stream=own, profile=1)
    ctx = SimpleNamespace(set_optimization_profile_async=lambda p, s: order.append(f"profile {p} on {s}") or True)
    assert trt_backend.TrtBackend._switch_profile(backend, ctx)
    assert order == ["backend waits caller", "profile 1 on 2", "caller waits backend"], order


def test_weight_streaming_budget_is_set_on_the_dit_engines_before_their_contexts(tiny_engines, tiny_ckpt, demo_frames,
                                                                                 tmp_path_factory, monkeypatch):
    """A STREAM=1 folder: the plan's budget goes to the DiT engines (capped at their streamable bytes) before
    TensorRT creates their contexts; the other engines keep every weight resident; the video is unchanged.
    A folder built without streaming refuses a budget."""
    monkeypatch.setattr(M, "target_tag", lambda backend: "fake-sm90-trt11.4")
    preset = ck.preset_for(tiny_ckpt)
    ort = ort_backend.OrtBackend(tiny_engines, tiny_ckpt, preset)
    with pytest.raises(M.EngineError, match="flf2v-build --weight_streaming"):
        FakeTrtBackend(relabel(tiny_engines, tmp_path_factory), tiny_ckpt, preset, ort, weight_budget=1234)
    folder = relabel(tiny_engines, tmp_path_factory, weight_streaming=True)
    ref = run(ort, preset, tiny_ckpt, demo_frames, 2)
    for budget, want in ((1234, 1234), (5 * 10**6, 10**6)):
        trt = FakeTrtBackend(folder, tiny_ckpt, preset, ort, weight_budget=budget)
        video = run(trt, preset, tiny_ckpt, demo_frames, 2)
        contexts = {c[1]: c[2] for c in trt.calls if c[0] == "context"}
        assert contexts["dit_b2"] == want and all(b == 10**6 for g, b in contexts.items() if not
                                                  g.startswith("dit")), contexts
        assert torch.equal(video, ref), f"max abs {(video - ref).abs().max().item():.3g}"


def test_cli_hands_a_stream1_folder_the_plans_resident_dit_bytes(tiny_engines, tiny_ckpt, demo_frames, tmp_path,
                                                                 tmp_path_factory, monkeypatch):
    """flf2v-run --offload blocks:1 on a STREAM=1 TensorRT folder (stand-in engines, TensorRT's presence faked):
    the backend opens with the plan's budget, the DiT's bytes less its one streamed block by the meta-device
    build of the tiny DiT (fp32), and the run writes its video."""
    from helpers import _args, run as cli_run

    from flf2v.models.dit import WanDiT
    from flf2v.runtime import backends as B
    monkeypatch.setattr(M, "target_tag", lambda backend: "fake-sm90-trt11.4")
    folder, preset = relabel(tiny_engines, tmp_path_factory, weight_streaming=True), ck.preset_for(tiny_ckpt)
    ort, opened = ort_backend.OrtBackend(tiny_engines, tiny_ckpt, preset), []

    def open_backend(kind, folder, ckpt_dir, preset, device, loras=(), **options):
        opened.append((kind, options))
        return FakeTrtBackend(folder, ckpt_dir, preset, ort, **options)
    monkeypatch.setattr(B, "open_backend", open_backend)
    monkeypatch.setattr(B, "check_backend", lambda kind, device: None)
    out = tmp_path / "v.mp4"
    args = _args(tiny_ckpt, demo_frames, out, "--engines", str(folder), "--offload", "blocks:1")
    args[args.index("--backend") + 1], args[args.index("--frame_num") + 1] = "trt", "9"
    assert cli_run(args) == 0 and out.exists()
    with torch.device("meta"):
        dit = WanDiT(preset.dit)
    assert preset.dit.num_layers == 2
    dit_bytes = 4 * sum(t.numel() for t in dit.state_dict().values())
    block = 4 * sum(t.numel() for t in dit.blocks[1].state_dict().values())
    assert opened == [("trt", {"weight_budget": dit_bytes - block})], opened
