"""DiT blocks streamed from host memory (`--offload blocks:N`, runtime/memory_plan.py).

The first N blocks stay on the device; the others keep their weights in (pinned) host memory and run in one
of two device slots, each a copy of a block's structure: while block i computes in one slot, block i+1's
weights are copied into the other on a side stream (CUDA), so at 720p the copies hide behind the compute.
Events order it: a slot's copy waits until the block that last used the slot has run, and a block waits for
its copy. The math is the resident block's on the same weights, so the result is bit-identical.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class StreamedBlocks(nn.Module):
    """Stands in for `WanDiT.blocks`: iterating it yields each block ready to run on `device`. `.to()` and
    other casts reach the resident blocks and the slots only; the streamed weights stay where they are."""

    def __init__(self, blocks: nn.ModuleList, resident: int, device: torch.device, pinned_cap: int | None = None,
                 place: bool = True):
        super().__init__()
        if not 0 <= resident < len(blocks):
            raise ValueError(f"resident blocks {resident} must be in 0..{len(blocks) - 1} (all of them: no streaming)")
        self.device, self.count = torch.device(device), len(blocks)
        self.resident = nn.ModuleList(blocks[:resident])
        cuda = self.device.type == "cuda"
        pinned, self.pinned_bytes = pinned_cap if pinned_cap is not None else float("inf"), 0
        # host copies of the streamed blocks' tensors, in the order of the slot's parameters and buffers
        self.host: list[list[torch.Tensor]] = []
        for block in blocks[resident:]:
            tensors = [t.detach().to("cpu") for t in block_tensors(block)]
            size = sum(t.nbytes for t in tensors)
            if cuda and self.pinned_bytes + size <= pinned:
                tensors = [t.pin_memory() for t in tensors]
                self.pinned_bytes += size
            self.host.append(tensors)
        self.slots = nn.ModuleList(copy.deepcopy(blocks[resident]) for _ in range(2))
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.ready = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.free = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.copies = 0  # host -> device block copies made (one per streamed block per forward)
        if place:  # else the caller moves it (an offloaded DiT goes to the device only for the loop)
            self.to(self.device)

    def __len__(self) -> int:
        return self.count

    def device_bytes(self) -> int:
        """Bytes of block weights on the device: the resident blocks and the two slots."""
        return sum(t.nbytes for m in (*self.resident, *self.slots) for t in block_tensors(m))

    def _fetch(self, i: int) -> None:
        """Start copying streamed block i (0 = the first after the resident ones) into slot i % 2."""
        s = i % 2
        dst = block_tensors(self.slots[s])
        if self.copy_stream is None:
            for d, h in zip(dst, self.host[i]):
                d.copy_(h)
        else:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.free[s])  # the slot's last block has run
                for d, h in zip(dst, self.host[i]):
                    d.copy_(h, non_blocking=True)
                self.ready[s].record(self.copy_stream)
        self.copies += 1

    def __iter__(self):
        yield from self.resident
        n = len(self.host)
        self._fetch(0)
        for i in range(n):
            s = i % 2
            if i + 1 < n:
                self._fetch(i + 1)  # into the other slot, while block i computes
            if self.copy_stream is not None:
                torch.cuda.current_stream(self.device).wait_event(self.ready[s])
            yield self.slots[s]
            if self.copy_stream is not None:
                self.free[s].record(torch.cuda.current_stream(self.device))


def block_tensors(module: nn.Module) -> list[torch.Tensor]:
    """A block's weights in the order the streamed AOTInductor block package takes them (parameters, then
    buffers: export/aoti_stream.block_weight_names)."""
    return [*(p.data for p in module.parameters()), *module.buffers()]


def stream_blocks(dit: nn.Module, resident: int, device, pinned_cap: int | None = None,
                  place: bool = True) -> StreamedBlocks:
    """Replace `dit.blocks` by its StreamedBlocks with `resident` blocks for `device`; with `place` the rest of
    the DiT (embeddings, head) and the resident blocks go to the device now, else they stay where they are."""
    streamed = StreamedBlocks(dit.blocks, resident, device, pinned_cap, place)
    blocks = dit.blocks
    del dit.blocks
    if place:
        dit.to(device)
    dit.blocks = streamed
    del blocks
    return streamed
