"""The DiT exported with attention="sage" for TensorRT: its self-attention as the quantization in standard ops
(export/sage_graph.py) feeding one wan_sage_attention plugin node (kernels/trt_plugin.py). On a CPU: the node's
inputs (dtypes, order, attributes), and the graph's meaning: onnx's reference evaluator runs it with the plugin
written here in numpy from the quantized algorithm's definition (scores from the int8 codes times the block
scales, in log2 units; P and V rounded to fp16), against the PyTorch DiT built with attention="sage" (its
kernels in the Triton interpreter). TensorRT builds with the plugin: not on this machine (no TensorRT runtime).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import rel_err
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from helpers import _heads, wan_cross_attention

from flf2v.export import build as B
from flf2v.export import contracts as C
from flf2v.export import passes as P
from flf2v.export.onnx_export import export_graph
from flf2v.export.plugins import CROSS_ATTENTION, DOMAIN, SAGE_ATTENTION, SAGE_PLUGINS
from flf2v.kernels.sage_attention import BLOCK_M, BLOCK_N
from flf2v.models.checkpoint import load as load_component
from flf2v.models.config import get_preset

PRESET = get_preset("tiny")
# Graph vs the torch DiT with the sage kernels: the same quantized algorithm; they differ where the graph's rstd
# (Reciprocal(Sqrt)) and the kernel's flip a code by one, and by the kernel's online softmax (P rounded against
# the running row max). Measured, seeds 1-3, max rel: 2.4e-6 to 9.3e-6 at 48 tokens (one block), 4.7e-5 to
# 6.5e-5 at 210 (ragged blocks). Measured mutants at 210 tokens: without the k smoothing 4.2e-4; the sage DiT
# itself is 5.0e-4 to 6.3e-4 from the exact one; a scale layout of the wrong order fails to broadcast.
TOL = 1.5e-4
EXACT_TOL = 0.04  # the 8-bit DiT against the exact one: tests/test_sage.py EXACT_MAX_REL


class wan_sage_attention(OpRun):  # noqa: N801  (the class name is the op_type)
    op_domain = DOMAIN

    def _run(self, q_codes, q_scales, k_codes, k_scales, v, num_heads=None, plugin_namespace=None, aot=None):
        s = v.shape[1]
        qs = np.repeat(q_scales.astype(np.float64), BLOCK_M, -1)[..., :s, None]  # [B, H, L, 1]
        ks = np.repeat(k_scales.astype(np.float64), BLOCK_N, -1)[..., None, :s]
        scores = (_heads(q_codes, num_heads) @ _heads(k_codes, num_heads).transpose(0, 1, 3, 2)) * qs * ks
        p = np.exp2(scores - scores.max(-1, keepdims=True))
        pv = p.astype(np.float16).astype(np.float64) @ _heads(v, num_heads).astype(np.float16).astype(np.float64)
        out = pv / p.sum(-1, keepdims=True)
        b, h, _, d = out.shape
        return (out.transpose(0, 2, 1, 3).reshape(b, s, h * d).astype(v.dtype),)


@pytest.fixture(scope="module", params=["tiny", "dynamic"])
def exported(request, tiny_ckpt, tmp_path_factory):
    shape = C.get_shape(PRESET, request.param)
    g = C.get_graph(PRESET, shape, "fp32", "dit_b2")
    ranges = shape.envelope() if g.dynamic else None
    path = export_graph(g, tiny_ckpt, tmp_path_factory.mktemp(f"sage-{request.param}") / f"{g.name}.onnx",
                        preset=PRESET, attention="sage", ranges=ranges)
    return g, path


def test_sage_graph_holds_the_plugin_nodes(exported):
    g, path = exported
    model = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    cfg = PRESET.dit
    assert Counter(n.op_type for n in nodes) == {SAGE_ATTENTION: cfg.num_layers, CROSS_ATTENTION: cfg.num_layers}
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(onnx.shape_inference.infer_shapes(model).graph.value_info) + list(model.graph.input)}
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == {"num_heads": cfg.num_heads, "plugin_namespace": b"flf2v", "aot": 1}, attrs
        if n.op_type == SAGE_ATTENTION:
            I8, F32 = onnx.TensorProto.INT8, onnx.TensorProto.FLOAT
            assert [types.get(x) for x in n.input] == [I8, F32, I8, F32, F32], (n.name, list(n.input))
    assert P.check_trt_ops(model, plugins=SAGE_PLUGINS) == []
    assert P.check_graph(path, g, plugins=SAGE_PLUGINS) == []
    onnx.checker.check_model(str(path), full_check=True)


def test_sage_graph_computes_the_sage_dit(exported, tiny_ckpt):
    """The graph (fp32) against the torch DiT with attention="sage" at the sample inputs, and both against the
    exact DiT."""
    g, path = exported
    # 210 tokens: 2 query blocks (128 + 82 rows) and 4 key blocks (3 x 64 + 18), both ragged
    dims = dict(zip(C.DIMS, (5, 7, 6))) if g.dynamic else None
    inputs = C.sample_inputs(g.at(dims) if dims else g, seed=1)
    run = ReferenceEvaluator(str(path), new_ops=[wan_sage_attention, wan_cross_attention])
    got = torch.from_numpy(run.run(None, {s.name: x.numpy() for s, x in zip(g.inputs, inputs)})[0])
    with torch.no_grad():
        sage = load_component(tiny_ckpt, "dit", torch.float32, PRESET, attention="sage")(*inputs).float()
        exact = load_component(tiny_ckpt, "dit", torch.float32, PRESET)(*inputs).float()
    err, rel = rel_err(got, sage)
    assert rel < TOL, f"{path.parent.name}: graph vs torch sage DiT max abs {err:.3g}, max rel {rel:.3g}"
    err, rel = rel_err(got, exact)
    assert 0 < rel < EXACT_TOL, f"{path.parent.name}: graph vs the exact DiT max abs {err:.3g}, max rel {rel:.3g}"


def test_sage_needs_a_gpu_backend(tiny_ckpt, tmp_path, capsys):
    argv = ["--ckpt_dir", str(tiny_ckpt), "--out", str(tmp_path / "e"), "--quiet", "--attention", "sage"]
    assert B.main(argv + ["--backend", "ort"]) == 2
    err = capsys.readouterr().err
    assert "--attention sage needs TensorRT or AOTInductor" in err and err.count("\n") == 1, err
    assert not (tmp_path / "e").exists()


@pytest.mark.gpu
def test_trt_sage_engine_matches_the_torch_sage_dit(tiny_ckpt, tmp_path):
    """A fp32 TensorRT DiT engine with the sage plugin against the torch DiT with attention="sage" (compiled
    kernels) on the same inputs (needs CUDA, TensorRT and polygraphy)."""
    from flf2v.kernels import common
    if not torch.cuda.is_available() or common.INTERPRET:
        pytest.skip("the sage plugin needs a CUDA GPU and the compiled Triton kernels (unset TRITON_INTERPRET)")
    pytest.importorskip("tensorrt", reason="TensorRT engines need the tensorrt package")
    pytest.importorskip("polygraphy", reason="the engine runs through polygraphy")
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from flf2v.kernels.trt_plugin import register_plugins
    folder = B.build(tiny_ckpt, "tiny", precision="fp32", out=tmp_path / "sage", backend="trt", only=["dit_b2"],
                     progress=False, attention="sage")
    register_plugins()
    g = C.get_graph(PRESET, C.get_shape(PRESET, "tiny"), "fp32", "dit_b2")
    inputs = C.sample_inputs(g, seed=1)
    with TrtRunner(EngineFromBytes(BytesFromPath(str(folder / "dit_b2.engine")))) as runner:
        got = torch.as_tensor(runner.infer({s.name: x.numpy() for s, x in zip(g.inputs, inputs)})["v"]).float()
    dit = load_component(tiny_ckpt, "dit", torch.float32, PRESET, attention="sage").cuda()
    with torch.no_grad():
        want = dit(*(x.cuda() for x in inputs)).float().cpu()
    err, rel = rel_err(got, want)
    assert rel < TOL, f"TensorRT sage engine vs torch sage DiT: max abs {err:.3g}, max rel {rel:.3g}"
