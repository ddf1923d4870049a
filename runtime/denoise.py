"""The denoising loop: one fixed tensor program per step, on static buffers.

`DenoiseLoop.step()` reads the current timestep and sampler coefficients from device buffers, runs the
DiT on cond + uncond, combines them (classifier-free guidance), applies the sampler update and writes
the new latent back into the same buffer. Without CFG (`cfg=False`, guide scale 1, where
uncond + 1 * (cond - uncond) = cond) the uncond forward is skipped: one DiT call on the cond context.
Nothing in it depends on the step index on the host, so on CUDA it is captured once as a CUDA graph
(after one eager warm-up, as graphs require) and replayed for every step; on the CPU it runs eagerly,
and tests prove it is capturable with `torch.export`.

The denoiser contract (every backend's `denoise(x, t, context, clip_fea, y)`): the result may alias a
buffer the backend owns and overwrites on its next call (TensorRT binds one static output buffer per
engine), so it is valid only until the next `denoise` call. The step therefore keeps what it needs of
one call in its own buffer before making the next (the cond velocity of the batch-1 CFG layout).

Layouts (`cfg`, `cfg_batch` = the DiT batch of each call): CFG as one batch-2 call on [x, x] with
[cond, uncond] context, or as two batch-1 calls; without CFG one batch-1 call, or, for engines that hold
only the batch-2 DiT, one batch-2 call on [x, x] with the cond context twice whose first half is kept.

Step cache (runtime/cache.py): with `cache=(denoise_full, denoise_cached)` there are two step programs.
`step()` runs the DiT in full and keeps what a skipped step needs, its blocks' output `hidden` (per CFG
row) and the latent `x_prev` it ran at; `step_cached()` runs the DiT's cached form on them (embeddings and
head only: the blocks' residual of the last full step added to this step's tokens). Which one each step
runs is the run's schedule, a host list fixed before the loop; both programs are captured on CUDA.

CFG-parallel (`cfg_split`, runtime/parallel.py): this process runs one branch's DiT call (batch 1, its own
context row), one all-gather over the branch pair brings both velocities into `v_pair`, and the guidance
and update follow as in one process: every rank of the pair holds the same latent after each step.

Non-finite latents are not checked inside the loop (that would sync the host every step): the step
records the first step whose output is not finite in a device scalar, read once after the loop.
"""
from __future__ import annotations

import torch

from .scheduler import State


class NumericalError(RuntimeError):
    """The latents became NaN/Inf during denoising, or the VAE decoded them to NaN/Inf."""


class DenoiseLoop(torch.nn.Module):
    """`forward()` is one step; every tensor it touches is a registered buffer (static address)."""

    def __init__(self, denoise, sampler, x: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor,
                 y: torch.Tensor, guide_scale: float, cfg_batch: int = 2, cfg: bool = True, cache=None,
                 hidden_shape: tuple[int, ...] | None = None, cfg_split=None):
        """`cache`: (denoise_full, denoise_cached) of the backend, with `hidden_shape` the DiT's hidden output
        per batch row (T, hp, wp, dim), to run cached steps as well. `cfg_split`: this rank's CFG branch
        (runtime/parallel.py CfgSplit); needs CFG and cfg_batch 1."""
        super().__init__()
        if cfg_batch not in (1, 2):
            raise ValueError(f"cfg_batch must be 1 or 2, got {cfg_batch}")
        if cfg_split is not None and (not cfg or cfg_batch != 1):
            raise ValueError(f"a CFG-parallel loop runs one branch per rank: needs cfg and cfg_batch 1, got "
                             f"cfg={cfg}, cfg_batch={cfg_batch}")
        self.cfg_split = cfg_split
        dev = x.device
        self.denoise, self.sampler, self.guide, self.cfg_batch = denoise, sampler, float(guide_scale), cfg_batch
        self.cfg = cfg
        self.steps = len(sampler.timesteps)
        buf = self.register_buffer
        # device tables, row i fed to step i
        buf("timesteps", sampler.timesteps.to(dev))
        buf("coefs", sampler.coefs.to(dev))
        buf("step_ids", torch.arange(self.steps, device=dev))
        # what one step reads and writes
        buf("x", x.float().clone())
        buf("t", torch.zeros((), dtype=torch.int64, device=dev))
        buf("coef", torch.zeros(sampler.coefs.shape[1], device=dev))
        buf("i", torch.zeros((), dtype=torch.int64, device=dev))
        buf("first_bad", torch.full((), self.steps, dtype=torch.int64, device=dev))
        state = sampler.init_state(self.x)
        buf("last", state.last)
        buf("m1", state.m1)
        buf("m2", state.m2)
        b = cfg_batch
        buf("ctx", self._context(context))
        buf("clip", clip_fea.expand(b, -1, -1).contiguous())
        buf("y", y.expand(b, -1, -1, -1, -1).contiguous())
        if cfg_split is not None:  # (cond, uncond) velocities of the pair, gathered each step
            buf("v_pair", torch.zeros(2, *self.x.shape[1:], device=dev))
        elif cfg and b == 1:  # the cond velocity, kept across the uncond call (see the denoiser contract above)
            buf("v_cond", torch.zeros_like(self.x))
        self.cache = cache
        if cache is not None:
            if hidden_shape is None:
                raise ValueError("a cached loop needs hidden_shape (T, hp, wp, dim)")
            # the DiT rows a step runs: [cond, uncond] with CFG (one batch-2 call or two batch-1 calls)
            buf("hidden", torch.zeros(1 if cfg_split else 2 if cfg else b, *hidden_shape, device=dev))
            buf("x_prev", torch.zeros_like(self.x))
        self.graph = self.graph_cached = None
        self.token = None  # the backend's graph_token when the graphs were captured

    def reset(self, x: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor, y: torch.Tensor) -> None:
        """A new run of the same shape and settings: new inputs into the same buffers (a captured graph
        stays valid), sampler state cleared."""
        self.x.copy_(x)
        self.ctx.copy_(self._context(context))
        self.clip.copy_(clip_fea.expand_as(self.clip))
        self.y.copy_(y.expand_as(self.y))
        self._clear()

    def _context(self, context: torch.Tensor) -> torch.Tensor:
        """The context rows the DiT calls read: [cond, uncond], this rank's branch row, or cond (no CFG)."""
        if self.cfg_split is not None:
            i = self.cfg_split.index
            return context[i:i + 1]
        return context if self.cfg else context[:1].expand(self.cfg_batch, -1, -1).contiguous()

    def _clear(self) -> None:
        for buf in (self.last, self.m1, self.m2):
            buf.zero_()
        self.first_bad.fill_(self.steps)

    def forward(self) -> None:
        self.step()

    def step(self) -> None:
        """One step with the DiT in full (keeping its hidden output when the loop caches)."""
        x = self.x
        v = self._guided(self._full)
        if self.cache is not None:
            self.x_prev.copy_(x)
        self._update(v)

    def step_cached(self) -> None:
        """One step that reuses the blocks' residual of the last full step."""
        self._update(self._guided(self._cached))

    def _full(self, xx, t, ctx, rows: slice):
        if self.cache is None:
            return self.denoise(xx, t, ctx, self.clip, self.y)
        v, hidden = self.cache[0](xx, t, ctx, self.clip, self.y)
        self.hidden[rows].copy_(hidden)
        return v

    def _cached(self, xx, t, ctx, rows: slice):
        return self.cache[1](xx, self.x_prev.expand_as(xx), t, self.y, self.hidden[rows])

    def _guided(self, call) -> torch.Tensor:
        """The guided velocity of this step, the DiT run through `call(x, t, context, rows)`."""
        x, b = self.x, self.cfg_batch
        if not self.cfg:
            xx = x if b == 1 else torch.cat([x, x])
            return call(xx, self.t.expand(b), self.ctx, slice(0, b))[:1].float()
        if self.cfg_split is not None:
            self.cfg_split.gather(self.v_pair, call(x, self.t.expand(1), self.ctx, slice(0, 1)).float())
            v_cond, v_uncond = self.v_pair[0:1], self.v_pair[1:2]
        elif b == 2:
            v_cond, v_uncond = call(torch.cat([x, x]), self.t.expand(2), self.ctx, slice(0, 2)).float().chunk(2)
        else:
            t = self.t.expand(1)
            v_cond = self.v_cond
            v_cond.copy_(call(x, t, self.ctx[:1], slice(0, 1)))
            v_uncond = call(x, t, self.ctx[1:], slice(1, 2)).float()
        return v_uncond + self.guide * (v_cond - v_uncond)

    def _update(self, v: torch.Tensor) -> None:
        out = self.sampler.step(self.coef, v, self.x, State(self.last, self.m1, self.m2))
        bad = ~torch.isfinite(out).all() & (self.first_bad == self.steps)
        self.first_bad.copy_(torch.where(bad, self.i, self.first_bad))
        self.x.copy_(out)

    def _load(self, i: int) -> None:
        self.t.copy_(self.timesteps[i])
        self.coef.copy_(self.coefs[i])
        self.i.copy_(self.step_ids[i])

    def capture(self) -> None:
        """Record `step` (and `step_cached`) as CUDA graphs: one eager warm-up of each, state restored,
        then capture."""
        x0 = self.x.clone()
        self._load(0)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()
            if self.cache is not None:
                self.step_cached()
        torch.cuda.current_stream().wait_stream(side)
        self.x.copy_(x0)
        self._clear()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()
        if self.cache is not None:
            self.graph_cached = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph_cached):
                self.step_cached()

    def release_graphs(self) -> None:
        """Drop the captured graphs and their private memory pools (the step's intermediates; ~20 GB at 720p
        with CFG batch 2 by the GPU-path audit's estimate, unmeasured); the next run of this loop captures
        again."""
        self.graph = self.graph_cached = None
        self.token = None

    def run(self, progress=None, compute: tuple[bool, ...] | None = None) -> torch.Tensor:
        """All steps; `compute[i]` False runs step i cached (a cached loop's schedule, step 0 computed)."""
        if compute is not None:
            if len(compute) != self.steps or not compute[0]:
                raise ValueError(f"a schedule needs {self.steps} flags, the first True; got {compute}")
            if not all(compute) and self.cache is None:
                raise ValueError("this loop was built without the step cache")
        for i in range(self.steps):
            self._load(i)
            full = compute is None or compute[i]
            graph = self.graph if full else self.graph_cached
            if graph is not None:
                graph.replay()
            elif full:
                self.step()
            else:
                self.step_cached()
            if progress is not None:
                progress.update(1)
        self.check_finite()
        return self.x

    def check_finite(self) -> None:
        bad = int(self.first_bad)  # the loop's only host sync, after the last step
        if bad < self.steps:
            raise NumericalError(f"the latents became NaN/Inf during denoising, first at step {bad + 1} of "
                                 f"{self.steps} (steps {bad + 1}-{self.steps} affected); try --dtype fp32 or a "
                                 f"smaller --sample_guide_scale, and check the checkpoint")
