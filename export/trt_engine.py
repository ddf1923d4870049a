"""ONNX -> TensorRT engine through polygraphy (GPU only; imported when a TensorRT build runs).

Strongly typed (TensorRT 11 builds nothing else; on 10.x the flag is set so bf16 graphs keep their fp32
islands), one static optimization profile, a timing cache shared by the folder's builds. The parser reads
the ONNX file by path so its external weights are found. Memory for the 14B DiT: the parser's copy of the
weights (1x, 33 GB in bf16) plus the serialized plan (1x), written from TensorRT's own buffer without a
Python copy: about 2-3x the weights in host RAM, within a 128 GB host; the GPU holds the weights and the
tactic workspace during the build (about 2x).
"""
from __future__ import annotations

import os
from pathlib import Path

from . import contracts as C


def has_plugin_nodes(onnx_path: Path) -> bool:
    from .passes import load_structure
    from .plugins import DOMAIN
    return any(n.domain == DOMAIN for n in load_structure(onnx_path).graph.node)


def build_trt_engine(onnx_path: Path, engine_path: Path, graph: C.Graph, opt_level: int, cache: Path) -> None:
    """Strongly typed TensorRT engine with one static profile, via polygraphy; atomic."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path

    if has_plugin_nodes(onnx_path):  # the ONNX parser looks the flf2v plugins up while parsing
        from flf2v.kernels.trt_plugin import register_plugins
        register_plugins()
    # TensorRT 11 builds every network strongly typed and ignores the (deprecated) flag
    strongly = True if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") else None
    network = network_from_onnx_path(str(onnx_path), strongly_typed=strongly)
    profile = Profile()
    for s in graph.inputs:
        profile.add(s.name, s.shape, s.shape, s.shape)
    config = CreateConfig(profiles=[profile], builder_optimization_level=opt_level,
                          load_timing_cache=str(cache) if cache.exists() else None)
    engine = engine_bytes_from_network(network, config, save_timing_cache=str(cache))
    tmp = engine_path.with_name(f".{engine_path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(engine)
    os.replace(tmp, engine_path)
