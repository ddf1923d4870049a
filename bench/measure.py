"""Clocks, memory gauges and the machine's load for every mode of the benchmark.

A stage's peak host RSS: the kernel's high-water mark (`VmHWM`) reset when the stage starts (via
`/proc/self/clear_refs`; where it cannot be, not Linux, the process-wide peak) and read when it ends. On CUDA
also the larger of torch's allocator peak and the device memory in use (TensorRT allocates outside torch).
"""
from __future__ import annotations

import codecs
import contextlib
import logging
import os
import statistics
import subprocess
import sys
import time

import torch

from flf2v.runtime.pipeline import StageTimes, cuda_device_used

log = logging.getLogger("flf2v.bench")
BUSY_PER_CPU = 1.0  # 1-minute load average per CPU above which the machine counts as busy


class ChildFailed(RuntimeError):
    """A child process of the benchmark failed; the message ends with its output."""


class BadInput(ValueError):
    """A flag or file the user gave cannot run here: flf2v-bench says so in one line and exits 2."""


def status_bytes(field_name: str) -> int | None:
    """A field of /proc/self/status, in bytes; None where there is none (not Linux)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith(field_name + ":")), None)
    return None


def rss_bytes() -> int:
    return status_bytes("VmRSS") or -1


def host_peak_bytes() -> int:
    import resource  # ru_maxrss (KiB on Linux): the process-wide peak, where VmHWM cannot be read
    return status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn):
    """(seconds, fn()) by the host clock."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_module(module: str, *args, show_progress: bool = False) -> float:
    """Seconds of `python -c 'from <module> import main; main(args)'` in a child process (an export's memory is
    then not this process's); ChildFailed with the end of its output when it fails."""
    cmd = [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))", *args]
    t0, tail, text = time.perf_counter(), "", codecs.getincrementaldecoder("utf-8")(errors="replace")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        try:
            while chunk := proc.stdout.read1(1 << 16):  # its progress shown live, its error kept for the report
                tail = (tail + (part := text.decode(chunk)))[-4000:]
                if show_progress:
                    sys.stderr.write(part)
                    sys.stderr.flush()
        except BaseException:  # Ctrl-C, SIGTERM: Popen's exit waited 0.25 s and left the child exporting, orphaned
            proc.terminate()  # its own clean-up (flf2v-build keeps what it finished), then no more time
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if proc.returncode:
        last = tail.replace("\r", "\n").strip().splitlines()
        raise ChildFailed(f"{module} failed (exit {proc.returncode}): {last[-1][-400:] if last else 'no output'}")
    return time.perf_counter() - t0


def load_avg() -> list[float] | None:
    with contextlib.suppress(OSError):  # not available on this platform
        return list(os.getloadavg())
    return None


def wait_for_idle(cpus: int, max_wait: float, poll: float = 5.0) -> dict:
    """Before timing anything: when the 1-minute load average is above BUSY_PER_CPU x `cpus`, wait (at most
    `max_wait` seconds) for it to drop. Returns what was seen, for the report."""
    limit = BUSY_PER_CPU * cpus
    first = last = load_avg()
    t0 = time.monotonic()
    busy = first is not None and first[0] > limit
    if busy:
        log.warning("the machine is busy (1-minute load average %.2f on %d CPUs); %s", first[0], cpus,
                    f"waiting up to {max_wait:.0f} s for it to drop below {limit:.1f}" if max_wait > 0
                    else "not waiting (--idle_wait 0)")
        while last[0] > limit and time.monotonic() - t0 < max_wait:
            time.sleep(max(0.0, min(poll, max_wait - (time.monotonic() - t0))))
            last = load_avg()
    still_busy = last is not None and last[0] > limit
    if still_busy:
        log.warning("still busy (load average %.2f); timing anyway, the report says so", last[0])
    return {"cpus": cpus, "busy_above": limit, "first_seen": first, "before": last,
            "waited_seconds": round(time.monotonic() - t0, 1) if busy else 0.0, "busy_before": still_busy}


def gemm_roof(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> dict:
    """This machine's measured GEMM roof: the best FLOP/s of an n x n x n `torch.mm` in the run's dtype and thread
    count (oneDNN/MKL on a CPU, cuBLAS on a GPU), the denominator of the project's "denoise loop >= 90% of the
    roof" target. n: 2048 on a CPU (0.08 s a product on the 2-vCPU Xeon, 2026-12-07), 8192 on a GPU (not run
    on one yet). The best of `repeats` after one warm-up: a roof is what the machine can do, not what it usually
    does."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    best = min(_product_seconds(a, b, device) for _ in range(repeats))
    return {"flops_per_s": 2 * n ** 3 / best, "n": n, "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "seconds": best}


def _product_seconds(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    stop = start_clock(device)
    torch.mm(a, b)
    return stop()


# ---- per-stage time and memory -------------------------------------------------------------------------

def start_clock(device: torch.device):
    """Starts a clock; calling what it returns gives the seconds since (on a GPU the stream's time, by CUDA
    events, not the launches')."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        return lambda: time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()

    def stop() -> float:
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    return stop


class Probe(StageTimes):
    """Per-stage time and peak memory (bytes), and host time inside wrapped calls. `with probe(name): ...`, or
    `start(name)` ... `stop(name)` where a stage's two ends lie in different hooks; a StageTimes, so it serves as
    `Pipeline.times` too. A span costs a high-water mark reset, two /proc reads and, on a GPU, two CUDA events
    and a synchronisation: the benchmark opens one per stage, never one per step."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.cuda = device, device.type == "cuda"
        self.host_peak: dict[str, int] = {}
        self.cuda_peak: dict[str, int | None] = {}  # None on the CPU
        self.calls: dict[str, float] = {}  # host seconds inside wrap()ped calls, per name
        self.log: list[tuple[str, float, float]] = []  # (name, host start, host end) of every span, in order
        self._open: dict[str, tuple] = {}

    def clear(self) -> None:
        for d in (self.seconds, self.host_peak, self.cuda_peak, self.calls, self.log, self._open):
            d.clear()

    def start(self, name: str) -> None:
        if name in self._open:
            raise RuntimeError(f"probe span {name!r} is already open")
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0); elsewhere the process-wide peak
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._open[name] = (time.perf_counter(), start_clock(self.device))

    def stop(self, name: str) -> None:
        t0, clock = self._open.pop(name)
        self.seconds[name] = self.seconds.get(name, 0.0) + clock()
        self.host_peak[name] = max(self.host_peak.get(name, 0), host_peak_bytes())
        # torch's allocator peak, or all memory in use (TensorRT's engines count) if higher
        self.cuda_peak[name] = max(self.cuda_peak.get(name) or 0, torch.cuda.max_memory_allocated(self.device),
                                   cuda_device_used(self.device)) if self.cuda else None
        self.log.append((name, t0, time.perf_counter()))

    @contextlib.contextmanager
    def __call__(self, name: str, device: torch.device | None = None):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def wrap(self, name: str, fn, span: bool = True, before=None, after=None):
        """`fn` with its host time added to calls[name] (only meaningful for synchronous execution: on a GPU the
        calls return before the work is done), inside a span of that name unless `span` is False; `before()`
        and `after()` run outside the timed part, right before and after it."""
        def metered(*args, **kw):
            if before is not None:
                before()
            t0 = time.perf_counter()
            with self(name) if span else contextlib.nullcontext():
                out = fn(*args, **kw)
            self.calls[name] = self.calls.get(name, 0.0) + time.perf_counter() - t0
            if after is not None:
                after()
            return out
        return metered


def stats(values: list[float]) -> dict:
    """Median, min, max, count, (max - min) / median and the values themselves."""
    med, lo, hi = statistics.median(values), min(values), max(values)
    return {"median": med, "min": lo, "max": hi, "n": len(values), "spread": (hi - lo) / med if med > 0 else 0.0,
            "values": list(values)}
