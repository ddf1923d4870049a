"""Part 9 of `make gpu-check`: DiT blocks streamed from pinned host memory (runtime/offload.py, the memory plan's
`blocks:N`) against the same blocks resident, at the 14B's width and the 720p token count. The slice's blocks
all stream (blocks:0, the artificial budget: two block slots on the GPU), so every block's copy has to hide
behind the previous block's compute; the output must be bit-identical to the resident run's. The host-to-device
copy of one block is timed alone too (the PCIe rate the cost model assumes: 25 GB/s). Box-safe at import."""
from __future__ import annotations

from flf2v.bench.gpu_common import (build_random_dit, check, free_cuda, log, model_preset, slice_inputs, timed_s,
                                    tokens_of, torch_denoiser)

BLOCKS = 4  # of the 14B's 40: two slots plus two more, so copies into both slots overlap compute


def part_offload(run, data: dict, part_end: float) -> None:
    import dataclasses

    import torch

    from flf2v.runtime.offload import stream_blocks
    preset = model_preset(run)
    shape = "tiny" if run.smoke else "720p"
    tokens, latent, _ = tokens_of(preset, shape)
    cfg = dataclasses.replace(preset.dit, num_layers=BLOCKS)
    dtype = torch.float32 if run.smoke else torch.bfloat16
    reps = 1 if run.smoke else 3
    dit = build_random_dit(cfg, dtype, run.device)
    args = slice_inputs(run, cfg, latent)
    denoise = torch_denoiser(dit, dtype, run.device)
    with torch.no_grad():
        ref = denoise(*args)
        t_resident, _ = timed_s(run, lambda: denoise(*args), reps)
        streamed = stream_blocks(dit, 0, run.device)  # every block from host memory through the two slots
        free_cuda(run)
        got = denoise(*args)
        t_streamed, _ = timed_s(run, lambda: denoise(*args), reps)
        t_copy, _ = timed_s(run, lambda: streamed._fetch(0), reps)
    block_bytes = sum(t.nbytes for t in streamed.host[0])
    data.update(model=preset.name, shape=shape, tokens=tokens, blocks=BLOCKS, dtype=str(dtype).removeprefix("torch."),
                block_bytes=block_bytes, pinned_bytes=streamed.pinned_bytes, resident_s=t_resident,
                streamed_s=t_streamed, overhead=t_streamed / t_resident - 1, block_copy_s=t_copy,
                copy_gb_s=block_bytes / t_copy / 1e9, device_block_bytes=streamed.device_bytes(),
                max_abs=float((got.float() - ref.float()).abs().max()))
    log(f"offload: {BLOCKS} blocks at {tokens} tokens: resident {t_resident:.3f} s, all streamed {t_streamed:.3f} s "
        f"({data['overhead']:+.1%}); one block's copy {t_copy * 1e3:.1f} ms ({data['copy_gb_s']:.1f} GB/s)")
    check([] if torch.equal(got, ref) else [f"streamed blocks differ from resident: max abs {data['max_abs']:.3g}"])
