"""Flow samplers against independent implementations: diffusers' UniPC / DPM-Solver++ step loops, and the
official schedules (the spec's UniPC timesteps, the dpm++ values printed by the official fm_solvers.py)."""

import pytest
import torch
from helpers import diffusers_unipc

from flf2v.runtime.scheduler import NUM_COEFS, FlowSampler, State, make_sampler

CASES = [(50, 16.0), (50, 5.0), (20, 3.0), (3, 16.0), (2, 5.0), (1, 5.0)]

# The official dpm++ schedule, (timesteps fed to the DiT, fp32 sigmas incl. the final 0) per (steps, shift):
# printed by running wan/utils/fm_solvers.py of github.com/Wan-Video/Wan2.1 (commit 9737cba) as
# wan/first_last_frame2video.py calls it:
#   s = FlowDPMSolverMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
#   timesteps, _ = retrieve_timesteps(s, device="cpu", sigmas=get_sampling_sigmas(steps, shift))
#   timesteps.tolist(), s.sigmas.tolist()
# diffusers has no equivalent: its DPMSolverMultistepScheduler(use_flow_sigmas=True) builds its own flow
# sigmas (linspace(1, 1/1000), first timestep 999 instead of 1000) and takes no custom sigmas, so the
# trajectory test below runs diffusers' solver on these official values.
# (50, 16): FLF2V defaults; (40, 5): I2V defaults (generate.py: 40 steps for i2v, shift 5; 3 at 480p).
OFFICIAL_DPMPP = {
    (50, 16.0): (
        [1000, 998, 997, 996, 994, 993, 991, 989, 988, 986, 984, 982, 980, 978, 976, 973, 971, 968, 966, 963,
         960, 956, 953, 949, 945, 941, 936, 931, 926, 920, 914, 907, 900, 891, 882, 872, 861, 848, 834, 818,
         800, 778, 752, 722, 685, 640, 581, 505, 400, 246],
        [1.0, 0.9987261, 0.9974026, 0.9960265, 0.9945946, 0.99310344, 0.9915493, 0.98992807, 0.9882353,
         0.98646617, 0.9846154, 0.98267716, 0.9806452, 0.9785124, 0.9762712, 0.973913, 0.9714286, 0.96880734,
         0.96603775, 0.9631068, 0.96, 0.95670104, 0.9531915, 0.94945055, 0.94545454, 0.9411765, 0.93658537,
         0.9316456, 0.9263158, 0.92054796, 0.9142857, 0.9074627, 0.9, 0.89180326, 0.8827586, 0.8727273,
         0.86153847, 0.8489796, 0.8347826, 0.81860465, 0.8, 0.77837837, 0.7529412, 0.7225807, 0.6857143, 0.64,
         0.58181816, 0.50526315, 0.4, 0.24615385, 0.0]),
    (40, 5.0): (
        [1000, 994, 989, 984, 978, 972, 965, 959, 952, 945, 937, 929, 921, 912, 902, 892, 882, 871, 859, 846,
         833, 818, 803, 787, 769, 750, 729, 706, 681, 654, 625, 592, 555, 514, 468, 416, 357, 288, 208, 113],
        [1.0, 0.99489796, 0.9895833, 0.9840425, 0.9782609, 0.9722222, 0.96590906, 0.9593023, 0.95238096,
         0.94512194, 0.9375, 0.92948717, 0.92105263, 0.9121622, 0.9027778, 0.89285713, 0.88235295, 0.8712121,
         0.859375, 0.8467742, 0.8333333, 0.8189655, 0.8035714, 0.787037, 0.7692308, 0.75, 0.7291667, 0.70652175,
         0.6818182, 0.6547619, 0.625, 0.59210527, 0.5555556, 0.5147059, 0.46875, 0.41666666, 0.35714287,
         0.28846154, 0.20833333, 0.11363637, 0.0]),
    (50, 5.0): (
        [1000, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 921, 913, 906, 898, 890,
         882, 873, 864, 854, 844, 833, 821, 809, 797, 783, 769, 753, 737, 720, 701, 681, 660, 637, 612, 585,
         555, 523, 487, 448, 405, 357, 303, 241, 172, 92],
        [1.0, 0.99593496, 0.9917355, 0.9873949, 0.982906, 0.9782609, 0.9734513, 0.9684685, 0.96330273,
         0.9579439, 0.95238096, 0.9466019, 0.9405941, 0.93434346, 0.92783505, 0.92105263, 0.9139785, 0.9065934,
         0.8988764, 0.8908046, 0.88235295, 0.87349397, 0.86419755, 0.8544304, 0.84415585, 0.8333333, 0.82191783,
         0.80985916, 0.79710144, 0.7835821, 0.7692308, 0.75396824, 0.73770493, 0.720339, 0.7017544, 0.6818182,
         0.6603774, 0.6372549, 0.6122449, 0.5851064, 0.5555556, 0.5232558, 0.4878049, 0.44871795, 0.4054054,
         0.35714287, 0.3030303, 0.24193548, 0.1724138, 0.09259259, 0.0]),
    (20, 3.0): (
        [1000, 982, 964, 944, 923, 900, 874, 847, 818, 785, 750, 710, 666, 617, 562, 500, 428, 346, 249, 136],
        [1.0, 0.98275864, 0.96428573, 0.9444444, 0.9230769, 0.9, 0.875, 0.84782606, 0.8181818, 0.78571427, 0.75,
         0.7105263, 0.6666667, 0.61764705, 0.5625, 0.5, 0.42857143, 0.34615386, 0.25, 0.13636364, 0.0]),
    (4, 16.0): (
        [1000, 979, 941, 842],
        [1.0, 0.97959185, 0.9411765, 0.84210527, 0.0]),
    (3, 16.0): (
        [1000, 969, 888],
        [1.0, 0.969697, 0.8888889, 0.0]),
    (2, 5.0): (
        [1000, 833],
        [1.0, 0.8333333, 0.0]),
    (1, 5.0): (
        [1000],
        [1.0, 0.0]),
}


def shifted(s, shift):
    return shift * s / (1 + (shift - 1) * s)


def diffusers_dpmpp(steps, shift):
    from diffusers import DPMSolverMultistepScheduler
    s = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
        algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        final_sigmas_type="zero", use_flow_sigmas=True, flow_shift=shift)
    s.set_timesteps(steps)
    # diffusers' solver on the official schedule (see OFFICIAL_DPMPP: diffusers' own flow schedule differs)
    timesteps, sigmas = OFFICIAL_DPMPP[(steps, shift)]
    s.sigmas = torch.tensor(sigmas, dtype=torch.float32)
    s.timesteps = torch.tensor(timesteps, dtype=torch.int64)
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


@pytest.mark.parametrize("steps,shift", list(OFFICIAL_DPMPP))
def test_dpmpp_schedule_equals_official(steps, shift):
    timesteps, sigmas = OFFICIAL_DPMPP[(steps, shift)]
    s = make_sampler("dpm++", steps, shift)
    assert s.timesteps.tolist() == timesteps
    assert timesteps[0] == 1000  # sigma 1 exactly: the DiT's time embedding must take t = 1000
    assert torch.equal(s.sigmas, torch.tensor(sigmas, dtype=torch.float32).double()), (s.sigmas, sigmas)


def test_diffusers_own_dpmpp_flow_schedule_is_not_the_official_one():
    """Why diffusers' DPM-Solver++ cannot be the schedule anchor: it starts at 999, the official at 1000."""
    from diffusers import DPMSolverMultistepScheduler
    s = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=16.0)
    s.set_timesteps(50)
    assert s.timesteps[0] == 999 and OFFICIAL_DPMPP[(50, 16.0)][0][0] == 1000


@pytest.mark.parametrize("steps,shift", CASES + [(100, 16.0), (40, 8.0), (30, 1.0)])
def test_unipc_schedule_matches_diffusers(steps, shift):
    ref = diffusers_unipc(steps, shift)
    s = make_sampler("unipc", steps, shift)
    assert s.timesteps.dtype == torch.int64 and s.sigmas.dtype == torch.float64
    assert s.coefs.dtype == torch.float32 and s.coefs.shape == (steps, NUM_COEFS)
    assert torch.equal(s.timesteps, ref.timesteps), (s.timesteps, ref.timesteps)
    assert torch.equal(s.sigmas, ref.sigmas.double()), (s.sigmas, ref.sigmas)
    assert s.sigmas[-1] == 0


@pytest.mark.parametrize("solver,steps,shift", [("unipc", *c) for c in CASES] + [("dpm++", *c) for c in OFFICIAL_DPMPP])
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
    # measured max rel 6.3e-7 (unipc 50 steps shift 5), 5.7e-7 (dpm++); fp32 steps vs our float64 coefficients
    assert rel < 2e-6, f"{solver} steps={steps} shift={shift}: max abs {err:.3e}, max rel {rel:.3e}"
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


@pytest.mark.gpu
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
