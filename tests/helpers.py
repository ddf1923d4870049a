"""Helpers several test modules share: the CLI driven in-process, diffusers' UniPC set up as the official
schedule, and the reference networks' outputs for one exported graph."""
from __future__ import annotations

import numpy as np
import torch

from flf2v.export import contracts as C
from flf2v.runtime.cli import main

# The official FlowUniPCMultistepScheduler starts its linspace at sigma_max, read back from fp32.
SIGMA_MAX = float(np.float32(0.999))


def run(args):
    try:
        return main(args)
    except SystemExit as e:  # argparse's own errors
        return e.code


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
