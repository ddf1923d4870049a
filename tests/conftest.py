import os

# AOTInductor compiles dominate the suite's time on a CPU: its host-side wrapper at -O0 (the kernels stay -O3,
# numerics unchanged) compiles the tiny DiT in 33 s instead of 39-40 s (2-vCPU Xeon). Read when
# torch._inductor.config is first imported; the build commands the tests start inherit it.
os.environ.setdefault("AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL", "O0")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run in the interpreter; the mode is fixed when flf2v.kernels is
# first imported, so it is chosen here, before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# one thread per pytest-xdist worker (`make test` runs three), else up to two
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


def pytest_configure(config):
    """Inductor's and Triton's caches in a folder of the run's own, removed when it ends (the workers and the
    commands the tests start inherit it): in /tmp and ~ they grew by about 200 MB a run on a machine that keeps
    them (each new build of the code compiles anew; a warm cache did not shorten a run)."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        return
    import shutil
    import tempfile
    scratch = tempfile.mkdtemp(prefix="flf2v-test-caches-")
    config.add_cleanup(lambda: shutil.rmtree(scratch, ignore_errors=True))
    for var, name in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        os.environ.setdefault(var, os.path.join(scratch, name))


def shared_dir(tmp_path_factory) -> "os.PathLike":
    """A folder every pytest-xdist worker of this session sees (the session's own temp folder without
    xdist): the expensive fixtures are built there once, the second worker finding them current."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once(tmp_path_factory, name: str, make):
    """`make(path)` run by the first worker to ask for `name` in the shared folder; the others wait and
    reuse its result."""
    import shutil

    from filelock import FileLock
    root = shared_dir(tmp_path_factory)
    path = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not path.exists():  # made aside and renamed: a failed `make` leaves nothing the next one reuses
            tmp = root / f".{name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            make(tmp)
            tmp.rename(path)
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (TensorRT, compiled Triton or CUDA graphs)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A complete tiny FLF2V checkpoint in the official layout (random weights, seed 0)."""
    from flf2v.models.make_tiny import write_tiny_checkpoint
    return once(tmp_path_factory, "ckpt", lambda p: write_tiny_checkpoint(p / "Wan2.1-FLF2V-tiny", "tiny", seed=0)) \
        / "Wan2.1-FLF2V-tiny"


@pytest.fixture(scope="session")
def demo_frames(tmp_path_factory):
    from flf2v.models.make_tiny import write_demo_frames
    folder = once(tmp_path_factory, "frames", write_demo_frames)
    return folder / "first.png", folder / "last.png"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |b|) of a against the reference b."""
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    return err, err / max(b.abs().max().item(), 1e-30)


@pytest.fixture(scope="session")
def tiny_engines(tiny_ckpt, tmp_path_factory):
    """ONNX Runtime engines (fp32) of the tiny checkpoint, built once per session by flf2v-build."""
    from flf2v.export.build import build
    # the folder test_export.py / test_build.py use too: whoever comes later finds the engines current
    return build(tiny_ckpt, "tiny", "fp32", out=shared_dir(tmp_path_factory) / "engines-cpu", backend="ort",
                 cfg_batch=(1, 2), progress=False)


@pytest.fixture(scope="session")
def tiny_dynamic_engines(tiny_ckpt, tmp_path_factory):
    """The default build (`dynamic`: every grid and frame count of its profiles) of the tiny checkpoint:
    ONNX Runtime, fp32, CFG as batch 2."""
    from flf2v.export.build import build
    return build(tiny_ckpt, None, "fp32", out=shared_dir(tmp_path_factory) / "engines-dynamic" / "dynamic",
                 backend="ort", cfg_batch=(2,), progress=False)


@pytest.fixture(scope="session")
def tiny_aoti_engines(tiny_ckpt, tmp_path_factory):
    """AOTInductor packages (fp32, CPU) of the tiny checkpoint at the static `tiny` shape, CFG as batch 2:
    compiled once per session (~2.5 min on 2 cores: a C++ compile per graph)."""
    from flf2v.export.build import build
    return build(tiny_ckpt, "tiny", "fp32", out=shared_dir(tmp_path_factory) / "engines-aoti" / "tiny",
                 backend="aoti", cfg_batch=(2,), progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    """The torch reference pipeline of the tiny checkpoint (one per test module)."""
    from flf2v.runtime.pipeline import Pipeline
    return Pipeline.from_checkpoint(tiny_ckpt)


@pytest.fixture(scope="module")
def frames(demo_frames):
    from flf2v.runtime.media import load_image
    return [load_image(p) for p in demo_frames]


@pytest.fixture(scope="module")
def dit_setup():
    """A tiny random DiT and loop inputs (x, context, clip, y) for denoising-loop tests."""
    import torch

    from flf2v.models.config import get_preset
    from flf2v.models.dit import WanDiT
    from flf2v.models.make_tiny import randomize_
    cfg = get_preset("tiny").dit
    dit = randomize_(WanDiT(cfg), torch.Generator().manual_seed(0)).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    context = torch.randn(2, 512, cfg.text_dim, generator=g)
    clip = torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=g)
    y = torch.randn(1, 20, 2, 4, 6, generator=g)
    return dit, x, context, clip, y
