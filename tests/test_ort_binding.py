"""OrtBackend's IO binding (issue 17): inputs bound to the torch tensors' memory, outputs to static buffers
reused across calls. It gives the NumPy path's video bit for bit, crosses to NumPy nowhere (the NumPy path
does for every tensor of every call), and the denoiser contract (a result aliases the buffer the next call
overwrites) holds through the denoising loop."""
import pytest
import torch

from flf2v.models import checkpoint as ck
from flf2v.runtime import engine_folders, ort_backend
from flf2v.runtime.denoise import DenoiseLoop
from flf2v.runtime.media import load_image
from flf2v.runtime.pipeline import Pipeline
from flf2v.runtime.scheduler import make_sampler

STEPS = 3


@pytest.fixture(scope="module")
def preset(tiny_ckpt):
    return ck.preset_for(tiny_ckpt)


def ort(tiny_engines, tiny_ckpt, preset, io_binding):
    return ort_backend.OrtBackend(tiny_engines, tiny_ckpt, preset, io_binding=io_binding)


def generate(backend, preset, tiny_ckpt, demo_frames, cfg_batch):
    pipe = Pipeline(backend, ck.load_tokenizer(tiny_ckpt, preset), preset)
    first, last = (load_image(p) for p in demo_frames)
    return pipe.generate("a red ball", first, last, sample_steps=STEPS, seed=7, cfg_batch=cfg_batch, progress=False)


class Crossings:
    """Counts tensors crossing between torch and NumPy (Tensor.numpy, torch.from_numpy) inside backend calls."""

    def __init__(self, monkeypatch, backend):
        self.by_graph, self.calls, self.active = {}, {}, None
        numpy, from_numpy, run = torch.Tensor.numpy, torch.from_numpy, backend._run

        def count(fn):
            def wrapped(*a, **kw):
                if self.active:
                    self.by_graph[self.active] = self.by_graph.get(self.active, 0) + 1
                return fn(*a, **kw)
            return wrapped

        def _run(graph, inputs):
            self.active, self.calls[graph] = graph, self.calls.get(graph, 0) + 1
            try:
                return run(graph, inputs)
            finally:
                self.active = None

        monkeypatch.setattr(torch.Tensor, "numpy", count(numpy))
        monkeypatch.setattr(torch, "from_numpy", count(from_numpy))
        monkeypatch.setattr(backend, "_run", _run)

    def per_step(self) -> float:
        dit = [g for g in self.calls if g.startswith("dit_b")]
        return sum(self.by_graph.get(g, 0) for g in dit) / STEPS


@pytest.mark.parametrize("cfg_batch", [1, 2])
def test_bound_video_equals_numpy_video(tiny_engines, tiny_ckpt, preset, demo_frames, cfg_batch):
    """Text, image and VAE encoders, the denoising loop and the VAE decode loop, bit for bit."""
    bound = generate(ort(tiny_engines, tiny_ckpt, preset, True), preset, tiny_ckpt, demo_frames, cfg_batch)
    ref = generate(ort(tiny_engines, tiny_ckpt, preset, False), preset, tiny_ckpt, demo_frames, cfg_batch)
    assert torch.equal(bound, ref), f"cfg_batch={cfg_batch}: bound vs NumPy path, max abs {(bound - ref).abs().max():.2e}"


@pytest.mark.parametrize("cfg_batch", [1, 2])
def test_host_crossings_per_denoising_step(tiny_engines, tiny_ckpt, preset, demo_frames, monkeypatch, cfg_batch):
    """NumPy path: the DiT's 5 inputs and 2 outputs (v, and the step cache's hidden) cross per call (1 call a
    step with cfg_batch 2, 2 with 1).
    Bound path: none, in the DiT or any other graph."""
    seen = {}
    for io_binding in (False, True):
        backend = ort(tiny_engines, tiny_ckpt, preset, io_binding)
        with monkeypatch.context() as m:
            crossings = Crossings(m, backend)
            generate(backend, preset, tiny_ckpt, demo_frames, cfg_batch)
        assert crossings.calls[f"dit_b{cfg_batch}"] == STEPS * (3 - cfg_batch)
        seen[io_binding] = crossings
    assert seen[False].per_step() == 7 * (3 - cfg_batch), seen[False].by_graph
    assert seen[True].per_step() == 0 and not seen[True].by_graph, seen[True].by_graph


def test_outputs_are_static_buffers(tiny_engines, tiny_ckpt, preset, demo_frames):
    """Every call of a graph returns the same output buffer; the VAE caches alternate between two sets."""
    backend = ort(tiny_engines, tiny_ckpt, preset, True)
    generate(backend, preset, tiny_ckpt, demo_frames, 2)
    _, bufs = backend.bindings[("dit_b2", 0)]
    dit_in = [torch.randn(s["shape"]) if s["dtype"] == "float32" else torch.zeros(s["shape"], dtype=torch.int64)
              for s in backend.specs["dit_b2"]["inputs"]]
    a = backend.denoise(*dit_in)
    b = backend.denoise(*dit_in)
    assert a.data_ptr() == b.data_ptr() == bufs["v"].data_ptr()
    caches = backend._caches("vae_decode_first")
    z = torch.randn(backend.specs["vae_decode_first"]["inputs"][0]["shape"])
    out1 = backend._run("vae_decode_first", [z, *caches])
    out2 = backend._run("vae_decode_chunk", [z, *out1[1:]])
    set_a, set_b = backend.cache_sets["decode"]
    assert [c.data_ptr() for c in caches] == [c.data_ptr() for c in set_a]
    assert [c.data_ptr() for c in out1[1:]] == [c.data_ptr() for c in set_b]
    assert [c.data_ptr() for c in out2[1:]] == [c.data_ptr() for c in set_a]


def test_cfg_batch1_keeps_the_cond_velocity(tiny_engines, tiny_ckpt, preset):
    """The uncond call overwrites the buffer the cond result lives in; the loop must have kept it first."""
    backend = ort(tiny_engines, tiny_ckpt, preset, True)
    spec = {s["name"]: s["shape"] for s in backend.specs["dit_b1"]["inputs"]}
    g = torch.Generator().manual_seed(3)
    x, clip, y = (torch.randn(spec[n], generator=g) for n in ("x", "clip_fea", "y"))
    context = torch.randn(2, *spec["context"][1:], generator=g)
    t = torch.tensor([500])
    first = backend.denoise(x, t, context[:1], clip, y)
    cond = first.clone()
    backend.denoise(x, t, context[1:], clip, y)
    assert not torch.equal(first, cond), "the result does not alias a reused buffer: this test proves nothing"

    def run(denoise):
        loop = DenoiseLoop(denoise, make_sampler("unipc", STEPS, 5.0), x, context, clip, y, 5.0, cfg_batch=1)
        return loop.run().clone()

    got = run(backend.denoise)
    want = run(lambda *a: backend.denoise(*a).clone())  # every result its own tensor
    assert torch.equal(got, want), f"bound outputs vs cloned ones, cfg_batch 1: max abs {(got - want).abs().max():.2e}"


@pytest.mark.gpu
def test_cuda_provider_matches_the_cpu(tiny_engines, tiny_ckpt, preset, demo_frames):
    """onnxruntime-gpu (make setup ORT=gpu): the bound CUDA path, ORT's CUDA graph for the DiT, against the
    CPU provider on the same fp32 graphs."""
    import onnxruntime
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with the CUDA execution provider (make setup ORT=gpu)")
    cpu = generate(ort(tiny_engines, tiny_ckpt, preset, True), preset, tiny_ckpt, demo_frames, 2)
    cuda_backend = ort_backend.OrtBackend(tiny_engines, tiny_ckpt, preset, device="cuda")
    pipe = Pipeline(cuda_backend, ck.load_tokenizer(tiny_ckpt, preset), preset, "cuda")
    first, last = (load_image(p) for p in demo_frames)
    video = pipe.generate("a red ball", first, last, sample_steps=STEPS, seed=7, cfg_batch=2, progress=False)
    err = (video.cpu() - cpu).abs().max().item()
    assert err < 1e-3, f"ORT CUDA vs CPU video: max abs {err:.2e} (TF32 convolutions on CUDA allow ~1e-4)"


def test_cpu_onnxruntime_on_cuda_is_refused_in_one_line(tiny_engines, tiny_ckpt, preset, monkeypatch):
    """The CPU build of onnxruntime (what plain `pip install onnxruntime` gives, and the GPU test box has) on a
    CUDA device: refused when the engines open, naming the install, not at the first call."""
    import onnxruntime as ort
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(engine_folders.EngineError, match=r"no CUDA provider.*make setup ORT=gpu.*--device cpu"):
        ort_backend.OrtBackend(tiny_engines, tiny_ckpt, preset, "cuda")
