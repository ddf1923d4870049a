"""Step caching on the sync-free denoising loop: TeaCache and MagCache with the schedule fixed before the loop.

Consecutive denoising steps change the DiT's blocks' residual (their output minus their input) little over
most of the schedule, so a step may reuse the residual of the last computed step: run the patch and time
embeddings and the head, skip the blocks (TeaCache, Liu et al. 2024; MagCache, Ma et al. 2025). Both
methods decide per step from numbers known before the loop, never from the latents: TeaCache from the
change of the timestep embedding `e` (a function of t only; the authors: "all prompts will skip the
same steps"), MagCache from a calibrated per-step curve of residual magnitude ratios. So the schedule is
computed here on the host, and the loop (runtime/denoise.py) replays one of two fixed programs per step,
the full step or the cached one, with no host sync (two CUDA graphs on a GPU).

Decisions follow the authors' code (ali-vilab/TeaCache TeaCache4Wan2.1/teacache_generate.py @7c10efc,
Zehong-Ma/MagCache MagCache4Wan2.1/magcache_generate.py @df81cb1), with one difference: they decide per
CFG branch, we decide per step (cond and uncond run as one batch), and a step is skipped only when every
branch would skip it. TeaCache's two branches always agree (same t); MagCache's published cond and uncond
curves differ in the 4th decimal.

Calibrations. The authors published Wan2.1 I2V-14B 720P and 480P calibrations, none for FLF2V-14B (the same
DiT architecture, another model); FLF2V runs use the I2V ones of the run's area as a stand-in unless the
checkpoint has its own: `flf2v-calibrate-cache` (runtime/calibrate_cache.py) records both curves in one full run and
writes CALIBRATION_FILE next to the checkpoint, which then wins.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

METHODS = ("off", "magcache", "teacache")
CALIBRATION_FILE = "flf2v_cache_calibration.json"
FORMAT = "flf2v-step-cache/1"
# (threshold, max consecutive skips) by method: the authors' recommended Wan2.1 I2V 720P settings
# (MagCache "E024K6R02"; TeaCache 0.2, their slower, higher-quality setting, no cap on skips)
DEFAULTS = {"magcache": (0.24, 6), "teacache": (0.2, None)}
MAGCACHE_RETENTION = 0.2  # the first 20 % of DiT calls always computed (the authors' retention_ratio)
# the shortest run calibrated, and cached: at 4 steps MagCache computed 1 (20 % of the calls kept, then the skips)
MIN_STEPS = 8

# MagCache mag_ratios (MagCache4Wan2.1/magcache_generate.py lines 1002, 1004 @df81cb1, Apache-2.0):
# 40 steps x (cond, uncond) interleaved, the first pair padding; calibrated with SDPA attention.
MAGCACHE_I2V_480P = (1.0, 1.0, 0.98783, 0.98993, 0.97559, 0.97593, 0.98311, 0.98319, 0.98202, 0.98225, 0.9888, 0.98878, 0.98762, 0.98759,
    0.98957, 0.98971, 0.99052, 0.99043, 0.99383, 0.99384, 0.98857, 0.9886, 0.99065, 0.99068, 0.98845, 0.98847,
    0.99057, 0.99057, 0.98957, 0.98961, 0.98601, 0.9861, 0.98823, 0.98823, 0.98756, 0.98759, 0.98808, 0.98814,
    0.98721, 0.98724, 0.98571, 0.98572, 0.98543, 0.98544, 0.98157, 0.98165, 0.98411, 0.98413, 0.97952, 0.97953,
    0.98149, 0.9815, 0.9774, 0.97742, 0.97825, 0.97826, 0.97355, 0.97361, 0.97085, 0.97087, 0.97056, 0.97055,
    0.96588, 0.96587, 0.96113, 0.96124, 0.9567, 0.95681, 0.94961, 0.94969, 0.93973, 0.93988, 0.93217, 0.93224,
    0.91878, 0.91896, 0.90955, 0.90954, 0.92617, 0.92616)
MAGCACHE_I2V_720P = (1.0, 1.0, 0.99428, 0.99498, 0.98588, 0.98621, 0.98273, 0.98281, 0.99018, 0.99023, 0.98911, 0.98917, 0.98646, 0.98652,
    0.99454, 0.99456, 0.9891, 0.98909, 0.99124, 0.99127, 0.99102, 0.99103, 0.99215, 0.99212, 0.99515, 0.99515,
    0.99576, 0.99572, 0.99068, 0.99072, 0.99097, 0.99097, 0.99166, 0.99169, 0.99041, 0.99042, 0.99201, 0.99198,
    0.99101, 0.99101, 0.98599, 0.98603, 0.98845, 0.98844, 0.98848, 0.98851, 0.98862, 0.98857, 0.98718, 0.98719,
    0.98497, 0.98497, 0.98264, 0.98263, 0.98389, 0.98393, 0.97938, 0.9794, 0.97535, 0.97536, 0.97498, 0.97499,
    0.973, 0.97301, 0.96827, 0.96828, 0.96261, 0.96263, 0.95335, 0.9534, 0.94649, 0.94655, 0.93397, 0.93414,
    0.91636, 0.9165, 0.89088, 0.89109, 0.8679, 0.86768)

# TeaCache coefficients, np.poly1d order, of the rel-L1 change of `e` (use_ret_steps=False: first and last
# step always computed); TeaCache4Wan2.1/teacache_generate.py lines 973-976 @7c10efc, Apache-2.0.
TEACACHE_I2V_480P = (-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01)
TEACACHE_I2V_720P = (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683)
PUBLISHED = {  # area class -> (mag_ratios, coefficients, source)
    "720P": (MAGCACHE_I2V_720P, TEACACHE_I2V_720P, "published Wan2.1 I2V-14B-720P calibration (MagCache, TeaCache)"),
    "480P": (MAGCACHE_I2V_480P, TEACACHE_I2V_480P, "published Wan2.1 I2V-14B-480P calibration (MagCache, TeaCache)"),
}


class CacheError(ValueError):
    """A step-cache request that cannot run (no calibration, bad settings): one line, exit code 2."""


@dataclass(frozen=True)
class Calibration:
    mag_ratios: tuple[float, ...]  # (cond, uncond) per step, interleaved as the authors' arrays
    coefficients: tuple[float, ...]  # TeaCache polynomial: rel-L1 change of e -> of the DiT output
    source: str  # where it comes from (a file, or the published one)
    cfg: bool = True  # recorded with CFG (a CFG-free calibration's uncond ratios repeat the cond ones)

    def ratios(self, steps: int) -> np.ndarray:
        """[steps, 2] (cond, uncond) resampled to `steps` by nearest index, as the authors' nearest_interp."""
        r = np.asarray(self.mag_ratios, dtype=np.float64).reshape(-1, 2)
        if len(r) == steps:
            return r
        if steps == 1:
            return r[-1:]
        idx = np.round(np.arange(steps) * ((len(r) - 1) / (steps - 1))).astype(int)
        return r[idx]


@dataclass(frozen=True)
class CachePlan:
    """A run's cache settings and the schedule they give: `compute[i]` False = step i reuses the residual."""
    method: str
    threshold: float
    max_skips: int | None
    calibration: str
    compute: tuple[bool, ...]

    def to_json(self) -> dict:
        return {"method": self.method, "threshold": self.threshold, "max_skips": self.max_skips,
                "calibration": self.calibration, "schedule": "".join("F" if c else "c" for c in self.compute),
                "steps_computed": sum(self.compute), "steps_skipped": len(self.compute) - sum(self.compute)}


def check_settings(method: str, threshold: float | None, max_skips: int | None) -> tuple[float, int | None]:
    """(threshold, max_skips) with the method's defaults; CacheError for a bad value."""
    if method not in METHODS:
        raise CacheError(f"--cache {method}: choose one of {', '.join(METHODS)}")
    if method == "off":
        return 0.0, None
    default_t, default_k = DEFAULTS[method]
    threshold = default_t if threshold is None else float(threshold)
    if not math.isfinite(threshold) or threshold < 0:
        raise CacheError(f"--cache_threshold {threshold} must be a finite number >= 0 (0: no step skipped; "
                         f"{method}'s default {default_t})")
    max_skips = default_k if max_skips is None else max_skips
    if max_skips is not None and (not isinstance(max_skips, int) or max_skips < 0):
        raise CacheError(f"--cache_max_skips {max_skips} must be an integer >= 0")
    return threshold, max_skips


# ---- schedules -------------------------------------------------------------------------------------

def magcache_schedule(ratios: np.ndarray, threshold: float, max_skips: int | None, cfg: bool = True,
                      retention: float = MAGCACHE_RETENTION) -> tuple[bool, ...]:
    """Compute flags per step from per-step (cond, uncond) magnitude ratios [steps, 2]: per branch the
    accumulated ratio's error sum(|1 - prod ratios|) since the last computed step must stay under
    `threshold`, at most `max_skips` steps in a row; the first `retention` of the DiT calls are computed."""
    steps = len(ratios)
    branches = (0, 1) if cfg else (0,)
    calls = len(branches) * steps
    keep = max(int(calls * retention), len(branches))  # step 0 always: nothing is cached before it
    acc_ratio, acc_err, acc_steps = [1.0, 1.0], [0.0, 0.0], [0, 0]
    out = []
    for i in range(steps):
        skip = True
        for b in branches:
            if len(branches) * i + b < keep:
                skip = False
                continue
            acc_ratio[b] *= float(ratios[i][b])
            acc_steps[b] += 1
            acc_err[b] += abs(1.0 - acc_ratio[b])
            skip &= acc_err[b] < threshold and (max_skips is None or acc_steps[b] <= max_skips)
        if not skip:
            acc_ratio, acc_err, acc_steps = [1.0, 1.0], [0.0, 0.0], [0, 0]
        out.append(not skip)
    return tuple(out)


def teacache_schedule(change: np.ndarray, coefficients, threshold: float,
                      max_skips: int | None = None) -> tuple[bool, ...]:
    """Compute flags per step from `change[i]`, the rel-L1 change of the timestep embedding from step i-1 to
    i: the rescaled changes poly(change) accumulate since the last computed step and the step is skipped
    while the sum stays under `threshold`; the first and last steps are always computed."""
    steps, poly = len(change), np.poly1d(coefficients)
    acc, run, out = 0.0, 0, []
    for i in range(steps):
        compute = i == 0 or i == steps - 1
        if not compute:
            acc += float(poly(change[i]))
            compute = acc >= threshold or (max_skips is not None and run >= max_skips)
        acc, run = (0.0, 0) if compute else (acc, run + 1)
        out.append(compute)
    return tuple(out)


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean |a - b| / mean |b| (TeaCache's distance)."""
    return float((a - b).abs().mean() / b.abs().mean())


def time_embeddings(ckpt_dir, preset, timesteps) -> torch.Tensor:
    """e [steps, dim] fp32, the DiT's time embedding of each timestep, from the checkpoint's own
    time_embedding weights (a few MB, read directly: engines hold them inside the DiT graph)."""
    from flf2v.models import checkpoint as ck
    from flf2v.models.dit import sinusoid_table
    src = ck.tensor_source(ckpt_dir, "dit")[0]
    w = {k: src[f"time_embedding.{k}"]().float() for k in ("0.weight", "0.bias", "2.weight", "2.bias")}
    t = torch.as_tensor(timesteps).long().cpu()
    x = sinusoid_table(preset.dit.num_train_timesteps + 1, preset.dit.freq_dim).float().index_select(0, t)
    x = torch.nn.functional.silu(x @ w["0.weight"].T + w["0.bias"])
    return x @ w["2.weight"].T + w["2.bias"]


def embedding_change(e: torch.Tensor) -> np.ndarray:
    """change[i] = rel-L1 of e[i] against e[i-1] (change[0] = 0)."""
    return np.array([0.0] + [rel_l1(e[i], e[i - 1]) for i in range(1, len(e))])


# ---- calibrations ----------------------------------------------------------------------------------

def published(preset, size: str) -> Calibration | None:
    """The authors' calibration for the 14B models at the area class of `size` (W*H), else None."""
    if not preset.name.endswith("-14B"):
        return None
    w, h = (int(v) for v in size.split("*"))
    ratios, coefs, source = PUBLISHED["720P" if w * h >= 1280 * 720 else "480P"]
    return Calibration(ratios, coefs, source + (" (none published for FLF2V; run flf2v-calibrate-cache for "
                                                "this checkpoint's own)" if preset.dit.model_type == "flf2v" else ""))


def read_calibration(path, fingerprint: str | None = None, chosen: bool = False) -> Calibration:
    """A calibration JSON written by flf2v-calibrate-cache; CacheError naming the fix when unusable. One made
    for another checkpoint than `fingerprint`'s: refused, or a warning when the user `chosen` it by name."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}, not {FORMAT!r}")
        cal = Calibration(tuple(float(v) for v in d["magcache"]["mag_ratios"]),
                          tuple(float(v) for v in d["teacache"]["coefficients"]), str(path),
                          cfg=not (isinstance(d.get("run"), dict) and d["run"].get("cfg") == "off"))
        if len(cal.mag_ratios) < 4 or len(cal.mag_ratios) % 2 or len(cal.coefficients) != 5:
            raise ValueError("mag_ratios must hold (cond, uncond) pairs and coefficients 5 values")
    except FileNotFoundError:
        raise CacheError(f"step-cache calibration {path}: no such file; check the path") from None
    except (OSError, ValueError, KeyError, TypeError) as e:  # a PNG, a metrics file, a damaged calibration
        raise CacheError(f"step-cache calibration {path} is not a flf2v-calibrate-cache file ({e}); give the "
                         f"file flf2v-calibrate-cache wrote, or run it again") from None
    if fingerprint is not None and d.get("checkpoint_fingerprint") != fingerprint:
        if not chosen:
            raise CacheError(f"step-cache calibration {path} was made for another checkpoint; run "
                             f"flf2v-calibrate-cache --ckpt_dir {Path(path).parent} again, or delete it")
        warnings.warn(f"step-cache calibration {path} was made for another checkpoint ({d.get('model')}); its "
                      f"schedule may skip steps this one needs (flf2v-calibrate-cache makes this checkpoint's)")
    return cal


def find_calibration(preset, ckpt_dir, size: str, path=None) -> Calibration:
    """`path`, else the checkpoint's own CALIBRATION_FILE, else the published one; CacheError if none."""
    from flf2v.export.manifest import checkpoint_fingerprint
    own = Path(ckpt_dir) / CALIBRATION_FILE
    if path is not None:
        return read_calibration(path, checkpoint_fingerprint(ckpt_dir), chosen=True)
    if own.is_file():
        return read_calibration(own, checkpoint_fingerprint(ckpt_dir))
    cal = published(preset, size)
    if cal is None:
        # a read-only checkpoint cannot take its own calibration: the file goes elsewhere, then is named
        run = (f"run flf2v-calibrate-cache --ckpt_dir {ckpt_dir} once" if os.access(ckpt_dir, os.W_OK) else
               f"the checkpoint is read-only: run flf2v-calibrate-cache --ckpt_dir {ckpt_dir} --out FILE.json once "
               f"and pass --cache_calibration FILE.json")
        raise CacheError(f"no step-cache calibration for {preset.name} (the authors published Wan2.1 I2V-14B "
                         f"ones only): {run}, or pass --cache_calibration FILE")
    return cal


def plan(method: str, threshold: float, max_skips: int | None, calibration: Calibration, timesteps, cfg: bool,
         ckpt_dir, preset) -> CachePlan:
    """The run's schedule. Threshold 0 computes every step whatever the method: TeaCache's rescaled change
    poly(x) is negative for small x with the published coefficients, which in the authors' code skips
    steps even at 0."""
    steps = len(timesteps)
    if threshold == 0:
        compute = (True,) * steps
    elif method == "magcache":
        compute = magcache_schedule(calibration.ratios(steps), threshold, max_skips, cfg)
    else:
        change = embedding_change(time_embeddings(ckpt_dir, preset, timesteps))
        compute = teacache_schedule(change, calibration.coefficients, threshold, max_skips)
    return CachePlan(method, threshold, max_skips, calibration.source, compute)
