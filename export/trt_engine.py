"""ONNX -> TensorRT engine through polygraphy (GPU only; imported when a TensorRT build runs).

Strongly typed (TensorRT 11 builds nothing else; on 10.x the flag is set so bf16 graphs keep their fp32
islands), a timing cache shared by the folder's builds. Static graphs get one fixed profile; dynamic
graphs one optimization profile per box of the folder's DynamicShape (landscape, portrait), each
min/opt/max of the root dims T, hp, wp turned into every input's shape by the contract. The parser reads
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


def trt_profiles(graph: C.Graph, profiles=None) -> list[list[tuple[str, tuple, tuple, tuple]]]:
    """Per optimization profile, (input name, min, opt, max shape) for every input. `profiles`: a dynamic
    graph's (min, opt, max) root dims per profile; a static graph has one profile, its own shapes."""
    if not graph.dynamic:
        return [[(s.name, s.shape, s.shape, s.shape) for s in graph.inputs]]
    if not profiles:
        raise ValueError(f"{graph.name} has dynamic dims: it needs optimization profiles")
    return [[(s.name, *(s.at(d).shape for d in p)) for s in graph.inputs] for p in profiles]


def build_trt_engine(onnx_path: Path, engine_path: Path, graph: C.Graph, opt_level: int, cache: Path,
                     profiles=None, weight_streaming: bool = False) -> None:
    """Strongly typed TensorRT engine via polygraphy, with the optimization profiles of `trt_profiles`;
    atomic. `weight_streaming`: BuilderFlag.WEIGHT_STREAMING (it needs the strongly typed network every
    TensorRT 11 network is), so the runtime can keep part of the weights in host memory."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path

    if has_plugin_nodes(onnx_path):  # the ONNX parser looks the flf2v plugins up while parsing
        from flf2v.kernels.trt_plugin import register_plugins
        register_plugins()
    # TensorRT 11 builds every network strongly typed and ignores the (deprecated) flag
    strongly = True if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") else None
    network = network_from_onnx_path(str(onnx_path), strongly_typed=strongly)
    built = []
    for rows in trt_profiles(graph, profiles):
        profile = Profile()
        for name, lo, opt, hi in rows:
            profile.add(name, lo, opt, hi)
        built.append(profile)
    config = CreateConfig(profiles=built, builder_optimization_level=opt_level,
                          load_timing_cache=str(cache) if cache.exists() else None,
                          weight_streaming=weight_streaming or None)
    engine = engine_bytes_from_network(network, config, save_timing_cache=str(cache))
    tmp = engine_path.with_name(f".{engine_path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(engine)
    os.replace(tmp, engine_path)
