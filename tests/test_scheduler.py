"""Flow samplers against diffusers' UniPC / DPM-Solver++ step loops (independent implementations)."""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from flf2v.runtime.scheduler import NUM_COEFS, FlowSampler, State, make_sampler

# The official FlowUniPCMultistepScheduler starts its linspace at sigma_max, read back from fp32.
SIGMA_MAX = float(np.float32(0.999))
CASES = [(50, 16.0), (50, 5.0), (20, 3.0), (3, 16.0), (2, 5.0), (1, 5.0)]


def shifted(s, shift):
    return shift * s / (1 + (shift - 1) * s)


def diffusers_unipc(steps, shift):
    s = UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", predict_x0=True,
        solver_type="bh2", lower_order_final=True, final_sigmas_type="zero", use_flow_sigmas=True,
        flow_shift=shift)
    # diffusers' own flow sigmas start at 1 and stop at 1/1000 (timesteps ..., 255 instead of 245).
    s.set_timesteps(sigmas=np.linspace(SIGMA_MAX, 0, steps + 1)[:-1])
    # Step by index: matching by timestep value picks index 1 when the first two timesteps are equal.
    s.set_begin_index(0)
    return s


def diffusers_dpmpp(steps, shift):
    s = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
        algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        final_sigmas_type="zero", use_flow_sigmas=True, flow_shift=shift)
    s.set_timesteps(steps)
    # diffusers takes no custom sigmas here; install the official get_sampling_sigmas schedule,
    # which starts at sigma = 1 exactly.
    sig = shifted(np.linspace(1, 0, steps + 1)[:steps], shift)
    s.sigmas = torch.from_numpy(np.append(sig, 0).astype(np.float32))
    s.timesteps = torch.from_numpy((sig * 1000).astype(np.int64))
    s.set_begin_index(0)
    return s


def fake_model(shape, seed):
    g = torch.Generator().manual_seed(seed)
    a, b, c = torch.rand(shape, generator=g) + 0.5, torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return lambda x, t: torch.tanh(a * x + b) * (t.float() / 1000) + c


def test_unipc_timesteps_official_values():
    # Listed in the spec from the official FlowUniPCMultistepScheduler (50 steps, shift 16).
    t = make_sampler("unipc", 50, 16.0).timesteps.tolist()
    assert t[:5] == [999, 998, 997, 995, 994] and t[-4:] == [581, 504, 399, 245], t


def test_dpmpp_timesteps_official_values():
    # From running the official get_sampling_sigmas + retrieve_timesteps (50 steps, shift 16).
    t = make_sampler("dpm++", 50, 16.0).timesteps.tolist()
    assert t[:5] == [1000, 998, 997, 996, 994] and t[-5:] == [640, 581, 505, 400, 246], t


@pytest.mark.parametrize("steps,shift", CASES + [(100, 16.0), (40, 8.0), (30, 1.0)])
@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_schedule_matches_diffusers(solver, steps, shift):
    ref = (diffusers_unipc if solver == "unipc" else diffusers_dpmpp)(steps, shift)
    s = make_sampler(solver, steps, shift)
    assert s.timesteps.dtype == torch.int64 and s.sigmas.dtype == torch.float64
    assert s.coefs.dtype == torch.float32 and s.coefs.shape == (steps, NUM_COEFS)
    assert torch.equal(s.timesteps, ref.timesteps), (s.timesteps, ref.timesteps)
    assert torch.equal(s.sigmas, ref.sigmas.double()), (s.sigmas, ref.sigmas)
    assert s.sigmas[-1] == 0


@pytest.mark.parametrize("steps,shift", CASES)
@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_trajectory_matches_diffusers(solver, steps, shift):
    shape = (1, 4, 3, 6, 10)
    fn = fake_model(shape, seed=steps)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1 + steps))
    ref = (diffusers_unipc if solver == "unipc" else diffusers_dpmpp)(steps, shift)
    s = make_sampler(solver, steps, shift)

    x, ref_traj = x0.clone(), []
    for t in ref.timesteps:
        x = ref.step(fn(x, t), t, x).prev_sample
        ref_traj.append(x)
    x, state, traj = x0.clone(), s.init_state(x0), []
    for i in range(steps):
        x = s.step(s.coefs[i], fn(x, s.timesteps[i]), x, state)
        traj.append(x)

    a, b = torch.stack(traj), torch.stack(ref_traj)
    err = (a - b).abs().max().item()
    rel = err / b.abs().max().item()
    assert rel < 1e-5, f"{solver} steps={steps} shift={shift}: max abs {err:.3e}, max rel {rel:.3e}"
    assert torch.equal(s.sample(fn, x0), x)


class StepModule(torch.nn.Module):
    def __init__(self, x):
        super().__init__()
        state = FlowSampler.init_state(x)
        self.register_buffer("last", state.last)
        self.register_buffer("m1", state.m1)
        self.register_buffer("m2", state.m2)

    def forward(self, coef, v, x):
        return FlowSampler.step(coef, v, x, State(self.last, self.m1, self.m2))


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_one_exported_step_replays_all_steps(solver):
    shape = (1, 4, 2, 4, 6)
    fn = fake_model(shape, seed=7)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    s = make_sampler(solver, 12, 5.0)
    ep = torch.export.export(StepModule(x0), (s.coefs[0], fn(x0, s.timesteps[0]), x0))
    step = ep.module()
    x = x0.clone()
    for i in range(len(s.timesteps)):
        x = step(s.coefs[i], fn(x, s.timesteps[i]), x)
    ref = s.sample(fn, x0)
    err = (x - ref).abs().max().item()
    assert err <= 1e-6 * ref.abs().max().item(), f"exported vs eager: max abs {err:.3e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_all_steps():
    shape = (1, 4, 3, 6, 10)
    cpu_fn = fake_model(shape, seed=3)
    fn = lambda x, t: cpu_fn(x.cpu(), t.cpu()).cuda()
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(4)).cuda()
    s = make_sampler("unipc", 50, 16.0)
    coefs = s.coefs.cuda()
    coef, v, x = coefs[0].clone(), torch.zeros_like(x0), x0.clone()
    state = s.init_state(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        s.step(coef, v, x, state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.copy_(s.step(coef, v, x, state))
    for buf in (state.last, state.m1, state.m2):
        buf.zero_()
    x.copy_(x0)
    for i in range(len(s.timesteps)):
        v.copy_(fn(x, s.timesteps[i]))
        coef.copy_(coefs[i])
        graph.replay()
    ref = s.sample(fn, x0)
    err = (x - ref).abs().max().item()
    assert err <= 1e-6 * ref.abs().max().item(), f"graph vs eager: max abs {err:.3e}"


def test_state_buffers_keep_addresses():
    x = torch.randn(2, 3, 4)
    s = make_sampler("unipc", 5, 3.0)
    state = s.init_state(x)
    ptrs = [t.data_ptr() for t in (state.last, state.m1, state.m2)]
    for i in range(5):
        v = torch.randn_like(x)
        m = x - s.sigmas[i].float() * v
        x = s.step(s.coefs[i], v, x, state)
        assert torch.allclose(state.m1, m, rtol=0, atol=1e-6)
    assert [t.data_ptr() for t in (state.last, state.m1, state.m2)] == ptrs


@pytest.mark.parametrize("solver,steps,shift", [
    ("euler", 50, 5.0), ("UniPC", 50, 5.0), ("unipc", 0, 5.0), ("unipc", -3, 5.0), ("unipc", 2.5, 5.0),
    ("dpm++", True, 5.0), ("dpm++", 50, 0.0), ("dpm++", 50, -1.0), ("unipc", 50, float("nan")),
    ("unipc", 50, float("inf")),
])
def test_bad_arguments(solver, steps, shift):
    with pytest.raises(ValueError):
        make_sampler(solver, steps, shift)
