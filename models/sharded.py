"""A network's weights sharded over the ranks of a device mesh (FSDP2, `torch.distributed.fsdp.fully_shard`),
loaded from the official checkpoint files with each rank reading only its own rows of every tensor.

`fully_shard` on each transformer block and on the root splits every parameter along dim 0 into
`torch.chunk`-sized pieces, one per rank; a block's full weights exist on a rank only while that block runs
(FSDP2 all-gathers them before its forward and frees them after). FSDP2 does not reshard the root's own
weights after its forward: the DiT's embeddings, time MLPs and head (~0.25 B parameters, 0.5 GB in bf16) stay
whole on every rank from the first step on (which the step cache's cached step, not a module call, relies on);
T5's 1 B-parameter token embedding is sharded on its own. So a rank holds ~1/N of the blocks' weights plus one
block and the DiT's root layers: the 14B DiT in bf16 (~33 GB) fits GPUs that cannot hold it whole. Safetensors are read with
`get_slice` (only the rank's rows leave the disk); `.pth` files are memory-mapped, so only the rows'
pages are touched. Every rank runs every block in the same order (Ulysses and CFG-parallel ranks alike),
as FSDP's collectives need. The all-gathers are not captured in a CUDA graph: such a run's denoising
step runs eagerly.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import checkpoint as ck


def rows_of(getter: Callable[[], torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Rows start:stop (dim 0) of a lazy checkpoint tensor, reading only them where the file allows."""
    rows = getattr(getter, "rows", None)
    return rows(start, stop) if rows is not None else getter()[start:stop]


def local_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """The dim-0 rows FSDP2 gives `rank` of `world` of a tensor with n rows (torch.chunk's split)."""
    size = -(-n // world)
    start = min(rank * size, n)
    return start, min(start + size, n)


def load_sharded(ckpt_dir, component: str, dtype: torch.dtype, preset, mesh, device, **kw) -> torch.nn.Module:
    """`component` ("dit" or "t5") of an official checkpoint, FSDP2-sharded over `mesh` (1-D, all ranks) on
    `device`, weights in `dtype` (checkpoint.load's result, sharded)."""
    from torch.distributed.fsdp import fully_shard
    if component not in ("dit", "t5"):
        raise ValueError(f"sharded loading is for the DiT and T5, not {component!r}")
    model = ck.build_meta(ckpt_dir, component, preset, **kw).to(dtype)
    source, origin, ignore = ck.tensor_source(ckpt_dir, component)
    ck.check_keys(model.state_dict().keys(), source, origin, ignore)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    if component == "t5":  # 1 B parameters: the root's own weights are not resharded after its forward
        fully_shard(model.token_embedding, mesh=mesh)
    fully_shard(model, mesh=mesh)
    tables = dict(model.named_buffers())  # T5's bucket table is built real; to_empty would leave it garbage
    model.to_empty(device=device)
    for name, table in tables.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, table.to(device), persistent=False)
    rank, world = mesh.get_local_rank(), mesh.size()
    with torch.no_grad():
        for name, p in model.named_parameters():
            start, stop = local_rows(p.shape[0], world, rank)
            local = p.to_local()
            if local.shape[0] != stop - start:
                raise RuntimeError(f"{name}: FSDP2 gave rank {rank} {local.shape[0]} rows of {p.shape[0]}, "
                                   f"expected {stop - start}")
            t = rows_of(source[name], start, stop)
            if tuple(t.shape[1:]) != tuple(p.shape[1:]):
                raise ck.CheckpointError(f"{origin}: {name!r} has rows of shape {tuple(t.shape[1:])}, the model "
                                         f"needs {tuple(p.shape[1:])}; the checkpoint does not match its config")
            local.copy_(t)
    return model.eval().requires_grad_(False)
