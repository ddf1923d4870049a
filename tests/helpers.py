"""Helpers several test modules share: the CLI driven in-process, diffusers' UniPC set up as the official
schedule, the reference networks' outputs for one exported graph, a stub backend, and TrtBackend with the
tiny ONNX graphs standing in for TensorRT engines, and the flf2v plugins' stand-ins for onnx's reference evaluator
(numpy, from their definition)."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import torch
from onnx.reference.op_run import OpRun

from flf2v.export import contracts as C
from flf2v.export import manifest as M
from flf2v.export.plugins import DOMAIN
from flf2v.runtime import engine_backend, trt_backend
from flf2v.runtime.cli import main

# The official FlowUniPCMultistepScheduler starts its linspace at sigma_max, read back from fp32.
SIGMA_MAX = float(np.float32(0.999))


def run(args):
    try:
        return main(args)
    except SystemExit as e:  # argparse's own errors
        return e.code


def saved_videos(monkeypatch) -> dict:
    """The [3, F, H, W] videos flf2v-run hands to save_video, by path, for comparing two runs bit-exactly: x264
    itself is not bit-reproducible on tiny noisy clips (measured with PyAV 18.1: 5 frames of 96x96 noise gave
    2 different encodes in 24 of the same frames, single-threaded too; with mbtree=0 or bframes=0, one)."""
    from flf2v.runtime import media
    saved, save = {}, media.save_video

    def keep(video, path, **kw):
        saved[str(path)] = video.detach().cpu().clone()
        return save(video, path, **kw)
    monkeypatch.setattr(media, "save_video", keep)
    return saved


def _args(ckpt, frames, out, *extra):
    return ["--ckpt_dir", str(ckpt), "--first_frame", str(frames[0]), "--last_frame", str(frames[1]),
            "--prompt", "a red ball", "--size", "64*64", "--frame_num", "5", "--sample_steps", "2",
            "--base_seed", "3", "--save_file", str(out), "--quiet", "--backend", "torch", *extra]


def diffusers_unipc(steps, shift):
    from diffusers import UniPCMultistepScheduler  # here: the GPU test box has no diffusers
    s = UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", predict_x0=True,
        solver_type="bh2", lower_order_final=True, final_sigmas_type="zero", use_flow_sigmas=True,
        flow_shift=shift)
    # diffusers' own flow sigmas start at 1 and stop at 1/1000 (timesteps ..., 255 instead of 245).
    s.set_timesteps(sigmas=np.linspace(SIGMA_MAX, 0, steps + 1)[:-1])
    # Step by index: matching by timestep value picks index 1 when the first two timesteps are equal.
    s.set_begin_index(0)
    return s


def reference(nets, graph: C.Graph, inputs) -> list[torch.Tensor]:
    """The graph's outputs computed by the reference networks themselves (no adapter)."""
    with torch.no_grad():
        if graph.component == "vae":
            vae, x, caches = nets["vae"], inputs[0], list(inputs[1:])
            step = vae.decode_chunk if "decode" in graph.name else vae.encode_chunk
            out, new = step(x, caches, graph.first)
            return [out, *new]
        if graph.name.startswith("dit_cached"):
            return [nets["dit"].forward_cached(*inputs)]
        if graph.component == "dit":  # v and the blocks' output (the step cache's `hidden`)
            return list(nets["dit"](*inputs, return_hidden=True))
        return [nets[graph.component](*inputs).float()]


class StubBackend:
    """A backend (runtime/backend.py) with the torch backend's answers and no networks, for the pipeline's
    checks of a request; keyword arguments set members (`cfg_batches=(1,)`: engines of one layout)."""
    name = "stub"
    ckpt_dir = folder = manifest = hint = video_shape = None
    cfg_batches = (1, 2)
    capturable = False
    steps_cache = True
    quant = "none"
    loras: list = []

    def __init__(self, **members):
        self.__dict__.update(members)

    def check_video(self, height, width, frame_num):
        return None

    def set_video(self, height, width, frame_num):
        pass

    def _no_network(self, *args, **kw):
        raise AssertionError("a stub backend runs no network")

    encode_text = encode_image = vae_encode = vae_decode = _no_network
    denoise = denoise_full = denoise_cached = _no_network

    def release_encoders(self):
        pass

    prepare_denoise = finish_denoise = release_encoders

    def graph_token(self, cfg_batch):
        return None


# ---- TensorRT stood in for by ONNX Runtime (tests/test_trt_backend.py, tests/test_backend_contract.py) ----

FAKE_TRT = SimpleNamespace(DataType=SimpleNamespace(FLOAT="f32", BF16="bf16", HALF="f16", INT64="i64"),
                           TensorIOMode=SimpleNamespace(INPUT="in", OUTPUT="out"))
TYPES = {"float32": "f32", "bfloat16": "bf16", "int64": "i64"}


class FakeEngine:
    def __init__(self, backend, graph, spec, session):
        self.backend, self.graph, self.session = backend, graph, session
        self.io = [(s, "in") for s in spec["inputs"]] + [(s, "out") for s in spec["outputs"]]
        self.num_io_tensors = len(self.io)
        self.num_optimization_profiles = len(spec.get("profiles") or [None])
        # weight streaming: what TensorRT reports for a streaming engine (default budget: every weight resident)
        self.streamable_weights_size = 10**6
        self.weight_streaming_budget_v2 = self.streamable_weights_size

    def get_tensor_name(self, i):
        return self.io[i][0]["name"]

    def _find(self, name):
        return next((s, m) for s, m in self.io if s["name"] == name)

    def get_tensor_mode(self, name):
        return self._find(name)[1]

    def get_tensor_shape(self, name):  # TensorRT reports a dynamic dim as -1
        return [d if isinstance(d, int) else -1 for d in self._find(name)[0]["shape"]]

    def get_tensor_dtype(self, name):
        return TYPES[self._find(name)[0]["dtype"]]

    def create_execution_context(self):
        self.backend.calls.append(("context", self.graph, self.weight_streaming_budget_v2))  # TensorRT reads it here
        return FakeContext(self)


class FakeContext:
    """Reads its inputs from, and writes its outputs to, whatever memory is bound by address."""

    def __init__(self, engine):
        self.engine, self.addresses, self.shapes, self.profile = engine, {}, {}, 0

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def set_optimization_profile_async(self, index, stream):
        assert 0 <= index < self.engine.num_optimization_profiles
        self.profile = index
        self.engine.backend.calls.append(("profile", self.engine.graph, index))
        return True

    def set_input_shape(self, name, shape):
        spec = self.engine._find(name)[0]
        assert len(shape) == len(spec["shape"]) and all(
            isinstance(d, str) or d == v for d, v in zip(spec["shape"], shape)), (name, shape, spec["shape"])
        self.shapes[name] = tuple(shape)
        self.engine.backend.calls.append(("shape", self.engine.graph, name, tuple(shape)))
        return True

    def execute_async_v3(self, stream):
        b = self.engine.backend
        known = {t.data_ptr(): t for e in b.engines.values() for _, bufs in e.shapes.values() for t in bufs.values()}
        known.update({t.data_ptr(): t for pair in b.cache_sets.values() for ts in pair for t in ts})
        b.executed.append((self.engine.graph, sorted(b.engines)))
        ins = {s["name"]: known[self.addresses[s["name"]]].numpy() for s, m in self.engine.io if m == "in"}
        for name, x in ins.items():  # a dynamic engine runs at the shapes its context was set to
            if any(isinstance(d, str) for d in self.engine._find(name)[0]["shape"]):
                assert self.shapes.get(name) == x.shape, (self.engine.graph, name, self.shapes.get(name), x.shape)
        out_ptrs = {self.addresses[s["name"]] for s, m in self.engine.io if m == "out"}
        in_ptrs = {self.addresses[s["name"]] for s, m in self.engine.io if m == "in"}
        assert not out_ptrs & in_ptrs, f"{self.engine.graph}: an output is bound to an input's memory"
        outs = self.engine.session.run(None, ins)
        for (s, _), o in zip([io for io in self.engine.io if io[1] == "out"], outs):
            known[self.addresses[s["name"]]].copy_(torch.from_numpy(o))
        return True


class FakeTrtBackend(trt_backend.TrtBackend):
    """TrtBackend with ONNX Runtime sessions as its engines and no CUDA streams."""

    def __init__(self, folder, ckpt_dir, preset, ort_backend, weight_budget=None):
        engine_backend.EngineBackend.__init__(self, folder, ckpt_dir, preset, "cpu", "trt")
        self.set_weight_budget(weight_budget)
        self.trt, self.ort, self.engines, self.cache_sets, self.executed = FAKE_TRT, ort_backend, {}, {}, []
        self.keep_dit, self._generation, self.stream, self.calls = False, 0, SimpleNamespace(cuda_stream=0), []

    def _deserialize(self, graph):
        return FakeEngine(self, graph, self.specs[graph], self.ort.session(graph))

    def _synchronize(self):
        pass

    def _enqueue(self, graph, ctx):
        assert ctx.execute_async_v3(0)

    def _switch_profile(self, ctx):  # no streams here (test_profile_switch_is_ordered_on_both_streams)
        return ctx.set_optimization_profile_async(self.profile, 0)


def relabel(ort_folder, tmp_path_factory, **manifest):
    """An ORT folder relabelled as a TensorRT folder of this 'machine' (`manifest`: more fields to set)."""
    folder = tmp_path_factory.mktemp("fake-trt") / ort_folder.name
    shutil.copytree(ort_folder, folder)
    m = json.loads((folder / M.MANIFEST).read_text())
    m.update(backend="trt", target="fake-sm90-trt11.4", **manifest)
    (folder / M.MANIFEST).write_text(json.dumps(m))
    return folder


# ---- the flf2v plugin ops in numpy (fp64, the activation dtype where the kernels round) -------------------

def _heads(x, num_heads):
    b, s, dim = x.shape
    return x.astype(np.float64).reshape(b, s, num_heads, dim // num_heads).transpose(0, 2, 1, 3)


def _attend(q, k, v, dtype):
    """softmax(q k^T / sqrt(D)) v per head, P rounded to v's dtype; [B, H, L, D] fp64."""
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(dtype).astype(np.float64)
    return p @ v


def _merge(x, dtype):
    b, h, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, h * d).astype(dtype)


class wan_cross_attention(OpRun):  # noqa: N801
    op_domain = DOMAIN

    def _run(self, q, k_txt, v_txt, k_img, v_img, num_heads=None, plugin_namespace=None, aot=None):
        qh = _heads(q, num_heads)
        out = (_attend(qh, _heads(k_txt, num_heads), _heads(v_txt, num_heads), q.dtype)
               + _attend(qh, _heads(k_img, num_heads), _heads(v_img, num_heads), q.dtype))
        return (_merge(out, q.dtype),)
