"""The denoising loop: equals a plain diffusers-scheduler CFG loop, is capturable, keeps its buffers."""
import copy

import pytest
import torch
from conftest import rel_err
from helpers import diffusers_unipc

from flf2v.runtime.denoise import DenoiseLoop, NumericalError
from flf2v.runtime.scheduler import make_sampler

STEPS, SHIFT, GUIDE = 6, 16.0, 5.0


@pytest.fixture(scope="module")
def setup(dit_setup):
    return dit_setup


def reference_loop(dit, x, context, clip, y):
    sched = diffusers_unipc(STEPS, SHIFT)
    for t in sched.timesteps:
        tt = torch.tensor([int(t)])
        v_c = dit(x, tt, context[:1], clip, y)
        v_u = dit(x, tt, context[1:], clip, y)
        x = sched.step(v_u + GUIDE * (v_c - v_u), t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("cfg_batch", [1, 2])
def test_loop_equals_diffusers_cfg_loop(setup, cfg_batch):
    dit, x, context, clip, y = setup
    loop = DenoiseLoop(dit, make_sampler("unipc", STEPS, SHIFT), x, context, clip, y, GUIDE, cfg_batch)
    out = loop.run()
    ref = reference_loop(dit, x, context, clip, y)
    err, rel = rel_err(out, ref)
    # measured rel 1.33e-6 (cfg_batch 1) and 1.31e-6 (2): fp32 sampler steps vs diffusers' own
    assert rel < 4e-6, f"loop vs diffusers CFG loop: max abs {err:.2e}, rel {rel:.2e}"


def test_buffers_keep_their_addresses(setup):
    dit, x, context, clip, y = setup
    loop = DenoiseLoop(dit, make_sampler("unipc", STEPS, SHIFT), x, context, clip, y, GUIDE)
    before = {k: b.data_ptr() for k, b in loop.named_buffers()}
    loop.run()
    after = {k: b.data_ptr() for k, b in loop.named_buffers()}
    assert before == after


DISTILL = [1000, 750, 500, 250]  # LightX2V's 4-step list (tests/test_fewstep.py)


# the CFG layouts (batch 2, two batch-1 calls, CFG-free batch 1 / batch-2 fallback) and the few-step sampler
@pytest.mark.parametrize("sampler_args,cfg,cfg_batch", [(("unipc", STEPS, SHIFT), True, 2),
                                                        (("unipc", STEPS, SHIFT), True, 1),
                                                        (("distill", 4, 5.0, DISTILL), False, 1),
                                                        (("distill", 4, 5.0, DISTILL), False, 2),
                                                        (("unipc", 4, 16.0), False, 1),
                                                        (("distill", 4, 5.0, DISTILL), True, 2)])
def test_step_exports_without_data_dependent_control_flow(setup, sampler_args, cfg, cfg_batch):
    dit, x, context, clip, y = setup
    ctx = context if cfg else context[:1]
    loop = DenoiseLoop(dit, make_sampler(*sampler_args), x, ctx, clip, y, GUIDE, cfg_batch, cfg=cfg)
    for i in range(2):  # a second-order step: every term of the update is live
        loop._load(i)
        loop.step()
    ep = torch.export.export(loop, ())
    exported = ep.module()
    loop._load(2)
    exported.load_state_dict(loop.state_dict(), strict=False)
    for name in ("t", "coef", "i", "x", "last", "m1", "m2"):
        getattr(exported, name).copy_(getattr(loop, name))
    exported()
    loop.step()
    err, rel = rel_err(exported.x, loop.x)
    assert rel < 1e-6, f"exported step vs eager: max abs {err:.2e}, rel {rel:.2e}"


def test_nonfinite_latents_are_reported_with_the_step(setup):
    dit, x, context, clip, y = setup
    sampler = make_sampler("unipc", STEPS, SHIFT)
    bad_from = int(sampler.timesteps[3])

    def poisoned(xx, t, *args):
        v = dit(xx, t, *args)
        return torch.where(t[:, None, None, None, None] <= bad_from, v * float("nan"), v)

    loop = DenoiseLoop(poisoned, sampler, x, context, clip, y, GUIDE)
    with pytest.raises(NumericalError, match=f"first at step 4 of {STEPS}"):
        loop.run()


def test_a_loop_reset_after_a_nonfinite_run_runs_as_a_new_one(setup):
    """The pipeline keeps its loops after a NumericalError; a reset that left a history term behind (unused, so
    multiplied by 0 on a first step: 0 * NaN) failed the next, finite run at its step 1."""
    dit, x, context, clip, y = setup
    poison = [True]

    def denoise(xx, t, *args):
        v = dit(xx, t, *args)
        return v * float("nan") if poison[0] and int(t[0]) < 900 else v
    loop = DenoiseLoop(denoise, make_sampler("unipc", STEPS, SHIFT), x, context, clip, y, GUIDE)
    with pytest.raises(NumericalError):
        loop.run()
    poison[0] = False
    loop.reset(x, context, clip, y)
    got = loop.run().clone()
    want = DenoiseLoop(denoise, make_sampler("unipc", STEPS, SHIFT), x, context, clip, y, GUIDE).run()
    err = rel_err(got, want)
    assert err[0] == 0.0, f"reset loop vs a new one: max abs {err[0]:.3g}, relative {err[1]:.3g}"


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(setup):
    # a copy on the GPU: `setup` is shared by the module's other tests, and Module.cuda() works in place
    dit = copy.deepcopy(setup[0]).cuda()
    x, context, clip, y = (t.cuda() for t in setup[1:])
    assert setup[0].patch_embedding.weight.device.type == "cpu"
    eager = DenoiseLoop(dit, make_sampler("unipc", STEPS, SHIFT), x, context, clip, y, GUIDE).run().clone()
    loop = DenoiseLoop(dit, make_sampler("unipc", STEPS, SHIFT), x, context, clip, y, GUIDE)
    loop.capture()
    err, rel = rel_err(loop.run(), eager)
    assert rel < 1e-5, f"CUDA graph vs eager: max abs {err:.2e}, rel {rel:.2e}"


class OneOutputBuffer:
    """A denoiser that returns the same output buffer on every call, as TensorRT's bound outputs do."""

    def __init__(self, dit):
        self.dit, self.out, self.calls = dit, None, 0

    def __call__(self, x, t, context, clip_fea, y):
        v = self.dit(x, t, context, clip_fea, y)
        if self.out is None:
            self.out = torch.empty_like(v)
        self.calls += 1
        return self.out.copy_(v)


@pytest.mark.parametrize("cfg_batch", [1, 2])
def test_loop_keeps_cfg_with_a_reused_output_buffer(setup, cfg_batch):
    """The uncond call must not overwrite the cond velocity (guidance would silently vanish)."""
    dit, x, context, clip, y = setup
    backend = OneOutputBuffer(dit)
    out = DenoiseLoop(backend, make_sampler("unipc", STEPS, SHIFT), x, context, clip, y, GUIDE, cfg_batch).run()
    assert backend.calls == STEPS * (3 - cfg_batch)
    ref = reference_loop(dit, x, context, clip, y)
    err, rel = rel_err(out, ref)
    assert rel < 1e-5, f"cfg_batch={cfg_batch} with a reused output buffer vs the CFG loop: max abs {err:.2e}, rel {rel:.2e}"
