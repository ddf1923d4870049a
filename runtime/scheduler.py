"""Flow-matching samplers of Wan2.1: UniPC (bh2, the official default) and DPM-Solver++ (2M), and the
few-step sampler of step-distilled models (`DistillSampler`, an explicit timestep list).

Every step of both solvers is one fixed linear combination of the same tensors; only its
coefficients change from step to step. They are worked out on the host in float64 once, so that
one denoising step can be captured in a CUDA graph and replayed for all steps, fed a new row of
`coefs` each time.

Flow matching: x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts v = noise - x0, so
x0 = x - sigma * v; alpha = 1 - sigma and lambda = log(alpha / sigma).

One step, with m = x0 predictions (m1, m2: the previous two) and `last` the previous corrected
sample:
    m   = x - sigma * v
    xc  = C_X * x + C_LAST * last + C_M0 * m + C_M1 * m1 + C_M2 * m2      (UniC corrector)
    out = P_XC * xc + P_M0 * m + P_M1 * m1                                (predictor)
The first UniPC step and every DPM++ step have no corrector (C_X = 1, rest 0).
"""

from dataclasses import dataclass

import numpy as np
import torch

SOLVERS = ("unipc", "dpm++")
DISTILL = "distill"  # the few-step sampler, chosen by giving its timesteps (--sample_timesteps)
NUM_TRAIN_TIMESTEPS = 1000

# Columns of FlowSampler.coefs.
SIGMA, C_X, C_LAST, C_M0, C_M1, C_M2, P_XC, P_M0, P_M1 = range(9)
NUM_COEFS = 9


@dataclass
class State:
    last: torch.Tensor  # corrected sample the previous predictor started from
    m1: torch.Tensor  # x0 prediction of the previous step
    m2: torch.Tensor  # x0 prediction of the step before that


@dataclass
class FlowSampler:
    solver: str
    timesteps: torch.Tensor  # int64 [N], what the DiT is given
    sigmas: torch.Tensor  # float64 [N + 1], last one 0
    coefs: torch.Tensor  # float32 [N, NUM_COEFS]

    @staticmethod
    def init_state(x: torch.Tensor) -> State:
        # Zeros, not empty: unused terms are multiplied by 0, and 0 * NaN would not vanish.
        return State(*(torch.zeros_like(x, dtype=torch.float32) for _ in range(3)))

    @staticmethod
    def step(coef: torch.Tensor, v: torch.Tensor, x: torch.Tensor, state: State) -> torch.Tensor:
        """Returns the next sample; updates `state` in place (its buffers keep their addresses)."""
        c = coef.float().unbind(0)
        x, v = x.float(), v.float()
        m = x - c[SIGMA] * v
        xc = c[C_X] * x + c[C_LAST] * state.last + c[C_M0] * m + c[C_M1] * state.m1 + c[C_M2] * state.m2
        out = c[P_XC] * xc + c[P_M0] * m + c[P_M1] * state.m1
        state.last.copy_(xc)
        state.m2.copy_(state.m1)
        state.m1.copy_(m)
        return out

    def sample(self, fn, x: torch.Tensor) -> torch.Tensor:
        """Eager loop: fn(x, t) returns the flow prediction v for sample x at timestep t."""
        x = x.float()
        state = self.init_state(x)
        coefs, timesteps = self.coefs.to(x.device), self.timesteps.to(x.device)
        for i in range(len(timesteps)):
            x = self.step(coefs[i], fn(x, timesteps[i]), x, state)
        return x


def make_sampler(solver: str, steps: int, shift: float, timesteps=None) -> FlowSampler:
    """`solver` "unipc" / "dpm++" with `steps` steps, or DISTILL with its `timesteps` (len == steps)."""
    if solver not in (*SOLVERS, DISTILL):
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not (isinstance(shift, (int, float, np.floating)) and np.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    if solver == DISTILL or timesteps is not None:
        if solver != DISTILL:
            raise ValueError(f"explicit timesteps run the {DISTILL} sampler, not {solver}")
        ts = check_timesteps(timesteps)
        if len(ts) != steps:
            raise ValueError(f"steps={steps} but {len(ts)} timesteps were given; drop the step count")
        return distill_sampler(ts, float(shift))
    timesteps, sigmas = flow_schedule(solver, int(steps), float(shift))
    table = unipc_coefs(sigmas) if solver == "unipc" else dpmpp_coefs(sigmas)
    if not np.isfinite(table).all():
        bad = np.argwhere(~np.isfinite(table))[0]
        raise ValueError(f"{solver} with steps={steps} shift={shift}: coefficient {tuple(bad)} is "
                         f"{table[tuple(bad)]} (sigmas too close to tell apart in fp32)")
    return FlowSampler(solver, torch.from_numpy(timesteps), torch.from_numpy(sigmas),
                       torch.from_numpy(table).float())


def flow_schedule(solver: str, steps: int, shift: float):
    """(timesteps int64 [N], sigmas float64 [N + 1]) exactly as the official code builds them."""
    if solver == "unipc":
        # FlowUniPCMultistepScheduler: linspace(sigma_max, 0) with sigma_max = 1 - 1/1000 read
        # back from a fp32 tensor (0.99900001287...), which decides a few truncated timesteps.
        s = np.linspace(float(np.float32(1 - 1 / NUM_TRAIN_TIMESTEPS)), 0.0, steps + 1)[:-1]
    else:
        # get_sampling_sigmas of fm_solvers.py: starts at sigma = 1 exactly, so the DiT's first timestep is
        # 1000 (one past the training range 0..999): the official model embeds it from the float value, and
        # WanDiT's time table has that row (models/dit.py).
        s = np.linspace(1.0, 0.0, steps + 1)[:steps]
    s = shift * s / (1 + (shift - 1) * s)
    timesteps = (s * NUM_TRAIN_TIMESTEPS).astype(np.int64)
    # The official solvers step with fp32 sigmas; near sigma = 1 that rounding moves
    # alpha = 1 - sigma by ~1e-3 relative, so keep exactly those values.
    sigmas = np.append(s, 0.0).astype(np.float32).astype(np.float64)
    return timesteps, sigmas


def _orders(n: int) -> list[int]:
    # Order 2 multistep: the first step has no history, and both official solvers drop to
    # order 1 on the last step (lower_order_final / final sigma 0).
    return [1 if i == 0 or i == n - 1 else 2 for i in range(n)]


def _alpha_lambda(sigmas: np.ndarray):
    with np.errstate(divide="ignore"):
        # sigma = 1 gives lambda = -inf and sigma = 0 gives +inf; both are meant (exp(-h) = 0).
        return 1 - sigmas, np.log(1 - sigmas) - np.log(sigmas)


def unipc_coefs(sigmas: np.ndarray) -> np.ndarray:
    """UniPC-2, predict_x0, B(h) = expm1(-h) ("bh2"), UniC corrector after every step."""
    n = len(sigmas) - 1
    alpha, lam = _alpha_lambda(sigmas)
    order = _orders(n)
    t = np.zeros((n, NUM_COEFS))
    for i in range(n):
        t[i, SIGMA] = sigmas[i]
        if i == 0:
            t[i, C_X] = 1.0
        else:
            # UniC from the previous corrected sample to sigma_i, with the order of the
            # predictor that produced x_i, and the fresh x0 prediction m_i.
            h = lam[i] - lam[i - 1]
            bh = np.expm1(-h)
            a = alpha[i] * bh
            if order[i - 1] == 1:
                rho_d, rho_t, rk = 0.0, 0.5, 1.0
            else:
                rk = (lam[i - 2] - lam[i - 1]) / h
                rho_d, rho_t = _unic_rhos(-h, rk)
            # xc = s_i/s_{i-1} last - alpha_i bh m1 - alpha_i bh (rho_d (m2 - m1)/rk + rho_t (m - m1))
            t[i, C_LAST] = sigmas[i] / sigmas[i - 1]
            t[i, C_M0] = -a * rho_t
            t[i, C_M1] = -a + a * rho_d / rk + a * rho_t
            t[i, C_M2] = -a * rho_d / rk
        h = lam[i + 1] - lam[i]
        t[i, P_XC] = sigmas[i + 1] / sigmas[i]
        t[i, P_M0] = -alpha[i + 1] * np.expm1(-h)
        if order[i] == 2:
            # UniP-2 uses rho = 1/2: x -= alpha bh / 2 * (m1 - m) / rk
            rk = (lam[i - 1] - lam[i]) / h
            a = alpha[i + 1] * np.expm1(-h) * 0.5 / rk
            t[i, P_M0] += a
            t[i, P_M1] = -a
    return t


def _unic_rhos(hh: float, rk: float):
    """Solves [[1, 1], [rk, 1]] rho = b for UniC-2 with B(h) = expm1(hh), hh = -h."""
    # phi cancels to O(h) then O(h^2): the official fp32 version loses ~1e-4 relative here.
    bh = np.expm1(hh)
    phi = bh / hh - 1
    b1 = phi / bh
    phi = phi / hh - 0.5
    b2 = phi * 2 / bh
    rho_d = (b1 - b2) / (1 - rk)
    return rho_d, b1 - rho_d


def dpmpp_coefs(sigmas: np.ndarray) -> np.ndarray:
    """DPM-Solver++(2M), midpoint, data prediction, no corrector."""
    n = len(sigmas) - 1
    alpha, lam = _alpha_lambda(sigmas)
    order = _orders(n)
    t = np.zeros((n, NUM_COEFS))
    for i in range(n):
        t[i, SIGMA] = sigmas[i]
        t[i, C_X] = 1.0
        h = lam[i + 1] - lam[i]
        a = alpha[i + 1] * np.expm1(-h)
        t[i, P_XC] = sigmas[i + 1] / sigmas[i]
        t[i, P_M0] = -a
        if order[i] == 2:
            # D1 = (m - m1) / r0 with r0 = h_prev / h; at step 1, h_prev = inf (sigma_0 = 1)
            # makes D1 vanish, as in the official code.
            inv_r0 = h / (lam[i] - lam[i - 1])
            t[i, P_M0] -= 0.5 * a * inv_r0
            t[i, P_M1] = 0.5 * a * inv_r0
    return t


# ---- few-step sampling of step-distilled models (LightX2V's WanStepDistillScheduler) -----------------

@dataclass
class DistillSampler(FlowSampler):
    """x0 = x - sigma_i v, then back out to sigma_{i+1} along the same v: x + (sigma_{i+1} - sigma_i) v,
    computed in LightX2V's order; the last step (sigma_{i+1} = 0) returns x0. Deterministic (no noise is
    re-injected) and without history, so it is one fixed program like the multistep solvers.
    coefs: float32 [N, 2] = (sigma_i, sigma_{i+1})."""

    @staticmethod
    def init_state(x: torch.Tensor) -> State:
        # no history: empty buffers keep DenoiseLoop's layout (and a captured graph) unchanged
        return State(*(torch.zeros(0, device=x.device) for _ in range(3)))

    @staticmethod
    def step(coef: torch.Tensor, v: torch.Tensor, x: torch.Tensor, state: State) -> torch.Tensor:
        sigma, sigma_next = coef.float().unbind(0)
        v = v.float()
        return (x.float() - sigma * v) + sigma_next * v


def check_timesteps(timesteps) -> tuple[int, ...]:
    """The few-step list as ints; ValueError (one line naming the fix) unless it is at least one integer,
    strictly descending, each in 1..1000 (LightX2V reads sigma at index 1000 - t of its 1000-entry table)."""
    ts = tuple(timesteps) if timesteps is not None else ()
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ts):
        why = "has values that are not integers"
    elif not ts:
        why = "is empty"
    elif not all(1 <= t <= NUM_TRAIN_TIMESTEPS for t in ts):
        why = f"has values outside 1..{NUM_TRAIN_TIMESTEPS}"
    elif any(a <= b for a, b in zip(ts, ts[1:])):
        why = "is not strictly descending"
    else:
        return tuple(int(t) for t in ts)
    raise ValueError(f"--sample_timesteps {','.join(str(t) for t in ts)!r} {why}; give descending integers in "
                     f"1..{NUM_TRAIN_TIMESTEPS}, e.g. 1000,750,500,250")


def distill_sampler(timesteps: tuple[int, ...], shift: float) -> DistillSampler:
    """LightX2V's set_denoising_timesteps: a 1000-entry fp32 table sigma = linspace(1, 0, 1001)[:-1],
    shifted as shift*s / (1 + (shift-1)*s), and timestep t takes entry 1000 - t; the last sigma is 0."""
    s = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)  # fp32, as theirs
    s = s[[NUM_TRAIN_TIMESTEPS - t for t in timesteps]].double().numpy()
    # LightX2V feeds the DiT the float t = 1000 sigma (e.g. 937.5); WanDiT and the engines embed integer
    # timesteps (a float64 table row per integer), so the nearest one is fed: at most 0.5 off.
    ts = np.floor(s * NUM_TRAIN_TIMESTEPS + 0.5).astype(np.int64)
    sigmas = np.append(s, 0.0)
    coefs = np.stack([sigmas[:-1], sigmas[1:]], axis=1)
    return DistillSampler(DISTILL, torch.from_numpy(ts), torch.from_numpy(sigmas), torch.from_numpy(coefs).float())
