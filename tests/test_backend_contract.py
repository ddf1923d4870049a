"""The backend contract (runtime/backend.py) holds for every backend this machine has: torch, ONNX Runtime,
AOTInductor, and TensorRT's logic with the tiny ONNX graphs standing in for engines (tests/helpers.py). Every
member is there with a value of its kind; every network call of the tiny preset gives the torch reference's
shape and dtype and its values within TOL; graph tokens are None or hashable; the stage calls run in the
pipeline's order, and the encoders load again after their release."""
import ast
import inspect
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from helpers import FakeTrtBackend, StubBackend, relabel

from flf2v.export import manifest as M
from flf2v.export.manifest import EngineError
from flf2v.models import checkpoint as ck
from flf2v.runtime import aoti_backend, ort_backend, torch_backend, trt_backend
from flf2v.runtime.backend import Backend
from flf2v.runtime.calibrate_cache import Recorder
from flf2v.runtime.media import load_image
from flf2v.runtime.pipeline import Pipeline

TOL = 1e-4  # fp32 engines vs the fp32 torch reference: max abs error over the reference's max |value|
SHAPE = (64, 64, 9)  # (height, width, frames) of export/contracts.py's static `tiny` shape, the engines' build
KINDS = ("torch", "ort", "aoti", "trt")
METHODS = sorted(n for n, v in vars(Backend).items() if inspect.isfunction(v) and not n.startswith("_"))
ATTRS = sorted(Backend.__annotations__)


def params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.fixture(scope="module")
def preset(tiny_ckpt):
    return ck.preset_for(tiny_ckpt)


@pytest.fixture(scope="module")
def reference(tiny_ckpt, preset):
    return torch_backend.TorchBackend(tiny_ckpt, preset)


@pytest.fixture(scope="module")
def fake_trt_target():
    """This 'machine' is the relabelled folder's TensorRT target while the module runs."""
    mp = pytest.MonkeyPatch()
    mp.setattr(M, "target_tag", lambda backend: "fake-sm90-trt11.4")
    yield
    mp.undo()


@pytest.fixture(scope="module", params=KINDS)
def backend(request, reference, tiny_ckpt, preset, tmp_path_factory):
    kind = request.param
    if kind == "torch":
        return reference
    if kind == "ort":
        return ort_backend.OrtBackend(request.getfixturevalue("tiny_engines"), tiny_ckpt, preset)
    if kind == "aoti":  # compiled once per session (conftest.py), shared with tests/test_aoti.py
        return aoti_backend.AotiBackend(request.getfixturevalue("tiny_aoti_engines"), tiny_ckpt, preset)
    request.getfixturevalue("fake_trt_target")
    engines = request.getfixturevalue("tiny_engines")
    return FakeTrtBackend(relabel(engines, tmp_path_factory), tiny_ckpt, preset,
                          ort_backend.OrtBackend(engines, tiny_ckpt, preset))


# ---- every member, of its kind --------------------------------------------------------------------------

def test_every_member_is_there(backend):
    missing = [m for m in ATTRS + METHODS if not hasattr(backend, m)]
    assert not missing and isinstance(backend, Backend), f"{type(backend).__name__} lacks {missing}"
    for m in METHODS:
        assert params(getattr(backend, m)) == params(getattr(Backend, m)), \
            f"{type(backend).__name__}.{m}{inspect.signature(getattr(backend, m))} is not the contract's"
    b = backend
    assert b.name in KINDS and isinstance(b.capturable, bool) and isinstance(b.steps_cache, bool)
    assert b.cfg_batches and set(b.cfg_batches) <= {1, 2}, b.cfg_batches
    assert Path(b.ckpt_dir).is_dir()
    if b.name == "torch":
        assert (b.folder, b.manifest, b.hint, b.video_shape, b.cfg_batches) == (None, None, None, None, (1, 2))
    else:  # the static `tiny` build of the engines
        assert isinstance(b.folder, Path) and isinstance(b.manifest, dict) and b.hint.startswith("run `flf2v-build --ckpt_dir ")
        assert b.video_shape == SHAPE, b.video_shape


def _assigned_in_init(cls) -> set[str]:
    """The `self.X` names every __init__ of the class's MRO assigns (tuple targets too)."""
    names = set()
    for c in cls.__mro__:
        if "__init__" not in vars(c) or c is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(vars(c)["__init__"])))
        except (OSError, TypeError):
            continue
        for node in ast.walk(tree):
            for t in getattr(node, "targets", []) if isinstance(node, ast.Assign) else []:
                for e in t.elts if isinstance(t, ast.Tuple) else [t]:
                    if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                        names.add(e.attr)
    return names


@pytest.mark.parametrize("cls", [torch_backend.TorchBackend, Recorder, ort_backend.OrtBackend,
                                 trt_backend.TrtBackend, aoti_backend.AotiBackend], ids=lambda c: c.__name__)
def test_every_class_defines_every_member(cls):
    """Statically, for TensorRT too (its __init__ needs a GPU): each member is the class's, or its __init__'s."""
    init = _assigned_in_init(cls)
    missing = [m for m in ATTRS + METHODS if not hasattr(cls, m) and m not in init]
    assert not missing, f"{cls.__name__} lacks {missing}"
    assert not [m for m in METHODS if params(getattr(cls, m)) != params(getattr(Backend, m))]


def test_the_tests_stub_backend_conforms():
    assert isinstance(StubBackend(), Backend)
    assert isinstance(StubBackend(cfg_batches=(1,)), Backend)


# ---- the networks agree with the torch reference ------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(reference, tiny_ckpt, preset, demo_frames):
    """The host inputs of one run at SHAPE, and the reference's encodings, which every backend's later
    stages take (each call compared on the same inputs)."""
    h, w, f = SHAPE
    pipe = Pipeline(reference, ck.load_tokenizer(tiny_ckpt, preset), preset)
    first, last = (load_image(p) for p in demo_frames)
    req = pipe.request("a red ball", first, last, size=f"{w}*{h}", frame_num=f, seed=0)
    x = pipe.prepare(req, first, last)
    x["context"] = reference.encode_text(x["ids"], x["mask"]).float()
    x["clip"] = reference.encode_image(x["pixels"]).float().reshape(1, -1, preset.clip.dim)
    x["y"] = torch.cat([x["msk"][None], reference.vae_encode(x["cond"][None])], dim=1)
    x["hidden"] = {n: reference.denoise_full(*_dit_args(x, n))[1].clone() for n in (1, 2)}
    return x


def _dit_args(x: dict, n: int, t: int = 999):
    """The DiT's inputs at batch n as the loop gives them (runtime/denoise.py): rows of the latent, the
    timestep, the context rows, CLIP features and condition expanded."""
    rows = lambda v: v.expand(n, *v.shape[1:])  # noqa: E731
    return rows(x["noise"]), torch.full((n,), t), x["context"][:n], rows(x["clip"]), rows(x["y"])


def outputs(b, x: dict) -> dict[str, torch.Tensor]:
    """Every network call of the contract in the pipeline's order, each result copied at once (a result
    may alias a buffer the next call of its graph overwrites)."""
    b.set_video(*SHAPE)
    out = {"encode_text": b.encode_text(x["ids"], x["mask"]).clone(),
           "encode_text_prompt": b.encode_text(x["ids"][:1], x["mask"][:1]).clone(),
           "encode_image": b.encode_image(x["pixels"]).clone(),
           "vae_encode": b.vae_encode(x["cond"][None]).clone()}
    b.release_encoders()
    b.prepare_denoise()
    for n in b.cfg_batches:
        args = _dit_args(x, n)
        out[f"denoise_b{n}"] = b.denoise(*args).clone()
        if b.steps_cache:
            v, hidden = b.denoise_full(*args)
            out[f"denoise_full_b{n}"], out[f"hidden_b{n}"] = v.clone(), hidden.clone()
            xx, _, _, _, y = _dit_args(x, n)
            later = torch.full((n,), 750)  # a skipped step: the latent moved on, the last full step's blocks
            out[f"denoise_cached_b{n}"] = b.denoise_cached(xx * 0.9, xx, later, y, x["hidden"][n]).clone()
        tok = b.graph_token(n)  # with the DiT loaded for the loop
        assert tok is None or isinstance(hash(tok), int), (b.name, n, tok)
    b.finish_denoise()
    out["vae_decode"] = b.vae_decode(x["noise"]).clone()
    out["encode_image_again"] = b.encode_image(x["pixels"]).clone()  # loaded again after its release
    return out


@pytest.fixture(scope="module")
def expected(reference, inputs):
    return outputs(reference, inputs)


def test_networks_agree_with_torch(backend, inputs, expected):
    got = outputs(backend, inputs)
    must = {"encode_text", "encode_image", "vae_encode", "vae_decode", *(f"denoise_b{n}" for n in backend.cfg_batches)}
    assert must <= set(got), f"{backend.name}: no {sorted(must - set(got))}"
    if backend.steps_cache:
        assert {f"denoise_cached_b{n}" for n in backend.cfg_batches} <= set(got)
    said = []
    for name, a in got.items():
        want = expected[name.replace("_again", "")]
        assert (a.shape, a.dtype) == (want.shape, want.dtype), f"{backend.name} {name}: {a.shape} {a.dtype}"
        err, rel = rel_err(a, want)
        said.append(f"{name} max abs {err:.2e}, rel {rel:.2e}")
        assert rel < TOL, f"{backend.name} {name} vs torch: max abs {err:.2e}, rel {rel:.2e} (tol {TOL:g})"
    print(f"{backend.name}: " + "; ".join(said))


def test_graph_tokens_are_none_or_hashable(backend):
    for stage in (backend.prepare_denoise, backend.finish_denoise):
        stage()
        for n in backend.cfg_batches:
            tok = backend.graph_token(n)
            assert tok is None or isinstance(hash(tok), int), (backend.name, n, tok)


def test_check_video_serves_its_shape_and_names_the_build_for_others(backend):
    backend.check_video(*SHAPE)
    backend.set_video(*SHAPE)
    other = (64, 96, 9)  # the `tiny-wide` grid
    if backend.video_shape is None:
        backend.check_video(*other)
    else:
        with pytest.raises(EngineError, match=r"needs 96x64, 9 frames.*`flf2v-build .*--preset "):
            backend.check_video(*other)
