"""A DiT graph (`dit_b1`, `dit_b2`) as three AOTInductor packages whose blocks the runtime streams
(`flf2v-build --backend aoti --weight_streaming`, `make engines BACKEND=aoti STREAM=1`).

A package compiles its weights in and puts them on the device when it loads, so a whole-DiT package is a
whole-DiT memory cost. Here the graph is cut where the weights are: `embed` (patch, time, text and image
embeddings, RoPE tables: a few hundred MB at 14B), `block` (one transformer block whose weights are
*inputs*, in the order of `block_weight_names`) and `head`. All 40 blocks share one graph, so one `block`
package serves them all; the runtime (runtime/aoti_backend.py) hands it each block's weights from the
device-resident blocks or the two slots the streamed ones are copied into (runtime/offload.py), as the
memory plan sets. The composed step equals the whole graph's: the same contract in and out.

| package | inputs | outputs |
|---|---|---|
| `<graph>.embed.pt2` | the graph's (x, t, context, clip_fea, y) | tokens [B,T,hp,wp,dim], e [B,dim], e0 [B,6,dim], txt [B,text_len,dim], img [B,clip_tokens,dim], cos, sin [L,head_dim/2] |
| `<graph>.block.pt2` | x [B,L,dim], e0, txt, img, cos, sin, then the block's weights | x [B,L,dim] |
| `<graph>.head.pt2` | hidden [B,T,hp,wp,dim], e | v [B,16,F,H,W] |
L = T*hp*wp; a dynamic build gives the block package L as a dim of its own over the products of the ranges.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from flf2v.models.dit import attention_ops

from .aoti import compile_package, export_package, load_net
from .contracts import Graph, TensorSpec, sample_inputs
from .onnx_export import _dynamic_shapes, _sample_dims

PARTS = ("embed", "block", "head")


def block_weight_names(block: nn.Module) -> list[str]:
    """The block package's weight inputs, in order: parameters, then buffers (runtime/offload.py's order)."""
    return [n for n, _ in block.named_parameters()] + [n for n, _ in block.named_buffers()]


class Embed(nn.Module):
    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, *inputs):  # positional, as the contract's adapters (onnx_export._dynamic_shapes)
        x, t, context, clip_fea, y = inputs
        self.dit.check_inputs(x, t, context, clip_fea, y)
        e, e0 = self.dit.time(t)
        h = self.dit.tokens(x, y)
        _, txt, img, cos, sin = self.dit.block_inputs(h, context, clip_fea)
        return h, e, e0, txt, img, cos, sin


class BlockStep(nn.Module):
    """One block with its weights as inputs. The block is kept out of the module tree (no registered
    parameters): the package holds no weights at all."""

    def __init__(self, block: nn.Module, attention: str):
        super().__init__()
        self.__dict__["block"] = block
        self.names = block_weight_names(block)
        self.attn_ops = attention_ops(attention)

    def forward(self, *inputs):
        x, e0, txt, img, cos, sin, *weights = inputs
        return torch.func.functional_call(self.block, dict(zip(self.names, weights)),
                                          (x, e0, txt, img, cos, sin, self.attn_ops))


class Head(nn.Module):
    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, *inputs):
        hidden, e = inputs
        return self.dit.unpatchify(hidden, e)


def compile_graph(graph: Graph, ckpt_dir, folder, preset=None, loras=(), attention: str = "onnx",
                  quant: str = "none", ranges=None, streamed: bool = False) -> dict[str, Path]:
    """`graph` compiled into `folder`: {"": <graph>.pt2}, or with `streamed` (a DiT step) its embed, block and
    head packages (`export_streamed`)."""
    if not streamed:
        return {"": export_package(graph, ckpt_dir, Path(folder) / f"{graph.name}.pt2", preset=preset, loras=loras,
                                   ranges=ranges, attention=attention, quant=quant)}
    return export_streamed(graph, load_net(graph, ckpt_dir, preset, loras, attention=attention, quant=quant), folder,
                           ranges)


def part_paths(graph: Graph, folder) -> dict[str, Path]:
    return {p: Path(folder) / f"{graph.name}.{p}.pt2" for p in PARTS}


def export_streamed(graph: Graph, dit: nn.Module, folder, ranges=None, device=None) -> dict[str, Path]:
    """Compile `graph` (dit_b*) of the loaded DiT `dit` into its three packages in `folder`; {part: path}.
    `dit` loses its blocks (all but one were only weights to the packages)."""
    if not graph.name.startswith("dit_b"):
        raise ValueError(f"only the DiT's full step streams its blocks, not {graph.name!r}")
    device = torch.device(device or next(dit.parameters()).device)
    block = dit.blocks[0]
    dit.blocks = nn.ModuleList()  # the embed and head packages hold no block weights
    embed, step, head = Embed(dit).eval(), BlockStep(block, dit.attention).eval(), Head(dit).eval()
    sample = graph.at(_sample_dims(ranges)) if graph.dynamic else graph
    args = tuple(t.to(device) for t in sample_inputs(sample))
    with torch.no_grad():
        h, e, e0, txt, img, cos, sin = embed(*args)
        weights = tuple(dict(block.named_parameters(), **dict(block.named_buffers()))[n] for n in step.names)
        block_args = (h.flatten(1, 3), e0, txt, img, cos, sin, *weights)
        hidden = step(*block_args).view(h.shape)
    paths = part_paths(graph, folder)
    compile_package(embed, args, _dynamic_shapes(graph, ranges), paths["embed"])
    compile_package(step, block_args, _block_dims(len(weights), ranges), paths["block"])
    head_graph = Graph(f"{graph.name}.head", "dit", graph.precision,
                       (graph.outputs[1], TensorSpec("e", graph.outputs[1].shape[:1] + graph.outputs[1].shape[-1:],
                                                     "float32")), graph.outputs[:1])
    compile_package(head, (hidden, e), _dynamic_shapes(head_graph, ranges), paths["head"])
    return paths


def _block_dims(n_weights: int, ranges):
    """The block package's dynamic shapes: the token count L of x, cos and sin, over the ranges' products."""
    if not ranges:
        return None
    lo, hi = (math.prod(r[i] for r in ranges.values()) for i in (0, 1))
    tokens = torch.export.Dim("L", min=max(lo, 2), max=hi)
    return ((({1: tokens}, None, None, None, {0: tokens}, {0: tokens}) + (None,) * n_weights),)
