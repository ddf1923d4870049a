"""Clocks and memory gauges for the benchmark: per-stage time and peak memory, summary statistics.

Time: CUDA events on a GPU (device time between two points of the stream), `perf_counter` on the CPU.
Memory: peak host RSS of a stage, by resetting the kernel's high-water mark (`VmHWM`, via
`/proc/self/clear_refs`) when the stage starts and reading it when it ends; on CUDA also the larger of
`torch.cuda.max_memory_allocated` since the stage started and the device memory in use when it ends
(`cudaMemGetInfo`: what TensorRT allocates itself, which torch's counters never see). Where the mark cannot be reset (not Linux),
the process-wide peak is reported and flagged.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from flf2v.runtime.pipeline import StageTimes, cuda_device_used


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return -1 if kb is None else kb * 1024


def _reset_host_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


HOST_PEAK_RESETTABLE = _reset_host_peak()


def host_peak_bytes() -> int:
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


class Clock:
    """Seconds from start() (or `with`) to stop(): CUDA events on a GPU (device time between two points of
    the stream), perf_counter on the CPU. `seconds` holds the last measurement."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0

    def start(self) -> "Clock":
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> float:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000
        else:
            self.seconds = time.perf_counter() - self._t0
        return self.seconds

    __enter__ = start

    def __exit__(self, *exc):
        self.stop()


@dataclass
class Sample:
    seconds: float = 0.0
    host_peak: int = 0  # bytes
    cuda_peak: int | None = None  # bytes


class Probe:
    """Per-stage time and peak memory. `with probe.span(name): ...`, or `start(name)` ... `stop(name)` for a
    stage whose two ends lie in different hooks, adds the span's time to `name` and raises its peak memory.

    Each span costs a reset of the host high-water mark, two /proc reads and, on a GPU, two CUDA events and
    a synchronisation: the benchmark opens one per stage on both sides, never one per step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.samples: dict[str, Sample] = {}
        self.log: list[tuple[str, float, float]] = []  # (name, host start, host end) of every span, in order
        self._open: dict[str, tuple[float, object]] = {}

    def clear(self) -> None:
        self.samples.clear()
        self.log.clear()
        self._open.clear()

    def start(self, name: str) -> None:
        if name in self._open:
            raise RuntimeError(f"probe span {name!r} is already open")
        _reset_host_peak()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._open[name] = (time.perf_counter(), Clock(self.device).start())

    def stop(self, name: str) -> None:
        t0, clock = self._open.pop(name)
        dt = clock.stop()
        t1 = time.perf_counter()
        s = self.samples.setdefault(name, Sample())
        s.seconds += dt
        s.host_peak = max(s.host_peak, host_peak_bytes())
        if self.cuda:  # torch's allocator peak, or all memory in use (TensorRT's engines count) if higher
            s.cuda_peak = max(s.cuda_peak or 0, torch.cuda.max_memory_allocated(self.device),
                              cuda_device_used(self.device))
        self.log.append((name, t0, t1))

    @contextmanager
    def span(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)


class StageProbe(StageTimes):
    """Drop-in for `Pipeline.times`: the pipeline's own stages, timed and gauged by a Probe."""

    def __init__(self, probe: Probe):
        super().__init__()
        self.probe = probe

    @contextmanager
    def __call__(self, name: str, device: torch.device | None = None):
        with self.probe.span(name):
            yield
        self.seconds[name] = self.probe.samples[name].seconds


class CallMeter:
    """Accumulated time inside wrapped calls (the network calls), with first start and last end per name.

    Only for synchronous execution (the CPU): on a GPU the calls return before the work is done."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def clear(self) -> None:
        for d in (self.seconds, self.calls, self.first, self.last):
            d.clear()

    def wrap(self, name: str, fn, probe: Probe | None = None, before=None, after=None):
        """`fn` timed under `name` (and inside a probe span of that name when `probe` is given); `before()` and
        `after()` run outside the timed part, right before and after it."""
        def timed(*args, **kw):
            if before is not None:
                before()
            t0 = time.perf_counter()
            if probe is None:
                out = fn(*args, **kw)
            else:
                with probe.span(name):
                    out = fn(*args, **kw)
            t1 = time.perf_counter()
            self.seconds[name] = self.seconds.get(name, 0.0) + t1 - t0
            self.calls[name] = self.calls.get(name, 0) + 1
            self.first.setdefault(name, t0)
            self.last[name] = t1
            if after is not None:
                after()
            return out
        return timed

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


class TimedBackend:
    """A backend whose network calls are counted by a CallMeter; everything else passes through."""

    CALLS = ("encode_text", "encode_image", "vae_encode", "vae_decode", "denoise")

    def __init__(self, backend, meter: CallMeter):
        self._backend = backend
        for name in self.CALLS:
            setattr(self, name, meter.wrap(name, getattr(backend, name)))

    def __getattr__(self, name):
        return getattr(self._backend, name)


@dataclass
class Stats:
    median: float
    min: float
    max: float
    n: int
    values: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, values: list[float]) -> "Stats":
        if not values:
            raise ValueError("no measurements")
        return cls(statistics.median(values), min(values), max(values), len(values), list(values))

    @property
    def spread(self) -> float:
        """(max - min) / median."""
        return (self.max - self.min) / self.median if self.median > 0 else 0.0

    def to_json(self) -> dict:
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n, "spread": self.spread,
                "values": self.values}
