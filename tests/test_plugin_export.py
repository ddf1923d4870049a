"""The DiT exported with attention="plugin": the fused Triton attention as flf2v TensorRT plugin nodes
(export/plugins.py). On a CPU: the structure (node domain, attributes, input order and dtypes, the graph
contract, the TensorRT op check) and the graph's meaning: onnx's reference evaluator runs it with the two
plugin ops written here in numpy from their definition (kernels/trt_plugin.py), against the PyTorch
reference DiT. ONNX Runtime cannot run custom-domain nodes. TensorRT builds with the plugins: gpu tests.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import rel_err
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from helpers import _attend, _heads, _merge, wan_cross_attention

from flf2v.export import build as B
from flf2v.export import manifest as M
from flf2v.export.trt_engine import has_plugin_nodes
from flf2v.export import contracts as C
from flf2v.export import passes as P
from flf2v.export.onnx_export import export_graph
from flf2v.models.checkpoint import load as load_component
from flf2v.export.plugins import CROSS_ATTENTION, DOMAIN, PLUGINS, SELF_ATTENTION
from flf2v.kernels import attention, cross_attention
from flf2v.models.config import get_preset

PRESET = get_preset("tiny")
SHAPE = C.get_shape(PRESET, "tiny")
# name -> (precision, streamed route); the 14B DiT takes the streamed route in bf16
VARIANTS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16-streamed": ("bf16", True)}
# max |graph - torch| / max |torch|: fp32 is one rounding apart; bf16 rounds the norm weights to bf16
# (the plugin's contract) where the reference keeps them fp32
TOL = {"fp32": 1e-5, "bf16": 1.6e-2}
F32, BF16 = onnx.TensorProto.FLOAT, onnx.TensorProto.BFLOAT16


def dit_graph(precision: str, batch: int = 2) -> C.Graph:
    return C.get_graph(PRESET, SHAPE, precision, f"dit_b{batch}")


def _no_kernel(*args, **kwargs):
    raise AssertionError("export ran a Triton kernel: tracing must use the ops' fake implementations only")


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tiny_ckpt, tmp_path_factory):
    precision, stream = VARIANTS[request.param]
    g = dit_graph(precision)
    out = tmp_path_factory.mktemp(f"plugin-{request.param}") / f"{g.name}.onnx"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "wan_self_attention", _no_kernel)
        mp.setattr(cross_attention, "wan_cross_attention", _no_kernel)
        path = export_graph(g, tiny_ckpt, out, preset=PRESET, stream=stream, attention="plugin")
    return g, path


def _value_types(model: onnx.ModelProto) -> dict[str, tuple[int, tuple]]:
    """name -> (elem type, shape) of every value, after shape inference (plugin schemas included)."""
    g = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    out = {t.name: (t.data_type, tuple(t.dims)) for t in g.initializer}
    for v in (*g.input, *g.output, *g.value_info):
        out[v.name] = (v.type.tensor_type.elem_type, tuple(d.dim_value for d in v.type.tensor_type.shape.dim))
    return out


def test_attention_is_plugin_nodes(exported):
    g, path = exported
    cfg = PRESET.dit
    model = P.load_structure(path)
    nodes = list(model.graph.node)
    assert not [n.name for n in nodes if n.op_type == "Attention"], "a standard Attention node is left"
    assert Counter((n.domain, n.op_type) for n in nodes if n.domain == DOMAIN) == \
        {(DOMAIN, SELF_ATTENTION): cfg.num_layers, (DOMAIN, CROSS_ATTENTION): cfg.num_layers}
    assert {(o.domain, o.version) for o in model.opset_import} >= {("", 23), (DOMAIN, 1)}

    act = F32 if g.precision == "fp32" else BF16
    b, (t, h, w) = g.inputs[0].shape[0], SHAPE.latent(PRESET)
    tokens = t * h * w // (cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2])
    q = (act, (b, tokens, cfg.dim))
    want = {  # the plugins' input order, dtypes and shapes (kernels/trt_plugin.py)
        SELF_ATTENTION: [q, q, q, (act, (cfg.dim,)), (act, (cfg.dim,)), (F32, (tokens, cfg.head_dim // 2)),
                         (F32, (tokens, cfg.head_dim // 2)), (F32, (b, tokens)), (F32, (b, tokens))],
        CROSS_ATTENTION: [q, (act, (b, cfg.text_len, cfg.dim)), (act, (b, cfg.text_len, cfg.dim)),
                          (act, (b, cfg.clip_tokens, cfg.dim)), (act, (b, cfg.clip_tokens, cfg.dim))],
    }
    types = _value_types(model)
    for n in nodes:
        if n.domain != DOMAIN:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == {"num_heads": cfg.num_heads, "plugin_namespace": DOMAIN.encode(), "aot": 1}, (n.name, attrs)
        assert [types.get(i) for i in n.input] == want[n.op_type], n.name
        assert len(n.output) == 1 and types[n.output[0]] == q, n.name

    assert P.check_trt_ops(model) == sorted(f"{DOMAIN}::{p}" for p in PLUGINS)
    assert P.check_trt_ops(model, plugins=PLUGINS) == []
    # contract I/O (names, shapes, dtypes), no float64, norms in fp32
    assert P.check_graph(path, g, plugins=PLUGINS) == []
    onnx.checker.check_model(str(path), full_check=True)  # against the plugin schemas, too


# ---- the plugins from their definition, in numpy (fp64, the activation dtype where the kernels round) --

class wan_self_attention(OpRun):  # noqa: N801  (the class name is the op_type)
    op_domain = DOMAIN

    def _run(self, q, k, v, norm_q_weight, norm_k_weight, cos, sin, rstd_q, rstd_k, num_heads=None,
             plugin_namespace=None, aot=None):
        def norm_rope(x, rstd, weight):
            # RMS-normed with the given statistics, rounded to x's dtype, weighted in x's dtype (WanRMSNorm)
            n = (x.astype(np.float64) * rstd[..., None]).astype(x.dtype) * weight
            n = _heads(n, num_heads)
            ev, od = n[..., 0::2], n[..., 1::2]  # pair i = channels (2i, 2i+1) of each head
            y = np.empty_like(n)
            y[..., 0::2], y[..., 1::2] = ev * cos - od * sin, ev * sin + od * cos
            return y.astype(x.dtype).astype(np.float64)

        out = _attend(norm_rope(q, rstd_q, norm_q_weight), norm_rope(k, rstd_k, norm_k_weight),
                      _heads(v, num_heads), v.dtype)
        return (_merge(out, q.dtype),)


def test_plugin_graph_computes_the_dit(exported, tiny_ckpt):
    """The exported graph, plugin nodes included, against the reference DiT (torch SDPA) in the graph's
    precision: checks the plugins' inputs (order, rstd, weights, RoPE tables) and attributes."""
    g, path = exported
    inputs = C.sample_inputs(g, seed=1)
    run = ReferenceEvaluator(str(path), new_ops=[wan_self_attention, wan_cross_attention])
    got = run.run(None, {s.name: x.numpy() for s, x in zip(g.inputs, inputs)})[0]
    dit = load_component(tiny_ckpt, "dit", g.compute_dtype, PRESET)
    assert dit.attention == "sdpa"
    with torch.no_grad():
        want = dit(*inputs).float()
    assert got.shape == g.outputs[0].shape and got.dtype == np.float32
    err, rel = rel_err(torch.from_numpy(got), want)
    assert rel < TOL[g.precision], f"{path.parent.name}: max abs {err:.3g}, max rel {rel:.3g}"


def test_attention_option_is_checked(tiny_ckpt, tmp_path, capsys):
    t5 = C.get_graph(PRESET, SHAPE, "fp32", "t5")
    with pytest.raises(ValueError, match="applies to DiT graphs"):
        export_graph(t5, tiny_ckpt, tmp_path / "t5.onnx", preset=PRESET, attention="plugin")
    with pytest.raises(ValueError, match="attention must be one of"):
        export_graph(dit_graph("fp32"), tiny_ckpt, tmp_path / "d.onnx", preset=PRESET, attention="flash")
    assert not list(tmp_path.iterdir())
    argv = ["--ckpt_dir", str(tiny_ckpt), "--out", str(tmp_path / "e"), "--quiet", "--attention", "plugin"]
    assert B.main(argv + ["--backend", "ort"]) == 2
    err = capsys.readouterr().err
    assert "--attention plugin needs TensorRT" in err and err.count("\n") == 1, err
    assert M.target_root("ort", "plugin").name == M.target_root("ort").name + "-plugin"


# ---- TensorRT (gpu) --------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("precision, tol", [("fp32", 1e-3), ("bf16", 5e-2)])
def test_trt_plugin_engines_match_default_engines(tiny_ckpt, tmp_path, precision, tol):
    """DiT engines with the plugins against the default engines (TensorRT's own attention) and the fp32
    graph on ONNX Runtime, on the same inputs; max |a - b| / max |ort| within `tol`."""
    if attention.INTERPRET:
        pytest.skip("the plugins need the compiled (not interpreted) Triton kernels: unset TRITON_INTERPRET")
    pytest.importorskip("tensorrt", reason="TensorRT engines need the tensorrt package")
    pytest.importorskip("polygraphy", reason="the engines are built and compared through polygraphy")
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator

    from flf2v.kernels.trt_plugin import register_plugins

    dits = ["dit_b1", "dit_b2"]
    folders = {a: B.build(tiny_ckpt, "tiny", precision=precision, out=tmp_path / a, backend="trt", only=dits,
                          cfg_batch=(1, 2), progress=False, attention=a) for a in ("onnx", "plugin")}
    manifests = {a: json.loads((f / "manifest.json").read_text()) for a, f in folders.items()}
    for a, m in manifests.items():
        assert m["attention"] == a and sorted(m["engines"]) == dits
        assert all(m["engines"][d]["attention"] == a for d in dits)
        assert has_plugin_nodes(folders[a] / "dit_b2.onnx") == (a == "plugin")
    assert manifests["plugin"]["engines"]["dit_b2"]["key"] != manifests["onnx"]["engines"]["dit_b2"]["key"]
    register_plugins()
    for name in dits:
        g = C.get_graph(PRESET, SHAPE, "fp32", name)
        ref = export_graph(g, tiny_ckpt, tmp_path / "fp32" / f"{name}.onnx", preset=PRESET)
        runners = [OnnxrtRunner(SessionFromOnnx(str(ref)), name="ort")] + [
            TrtRunner(EngineFromBytes(BytesFromPath(str(folders[a] / f"{name}.engine"))), name=a) for a in folders]
        feed = {s.name: x.numpy() for s, x in zip(g.inputs, C.sample_inputs(g, seed=1))}
        out = {r: np.asarray(res[0]["v"], np.float64) for r, res in Comparator.run(runners, data_loader=[feed]).items()}
        scale = np.abs(out["ort"]).max()
        errs = {f"{a} vs {b}": float(np.abs(out[a] - out[b]).max() / scale)
                for a, b in (("plugin", "ort"), ("onnx", "ort"), ("plugin", "onnx"))}
        assert max(errs.values()) < tol, (name, precision, errs)
