"""The one report writer of `flf2v-bench`: <out>/<stem>.json (raw), .md and, for the headline stage
comparison, .png; the machine description they carry; Markdown helpers (also for `make gpu-check`'s report).
Box-safe at import: stdlib only (torch and matplotlib are imported inside the functions that use them)."""
from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1024 ** 3
STAGE_LABELS = {"text_encoder": "T5", "image_encoder": "CLIP", "vae_encode": "VAE enc", "denoise_step": "1 step",
                "denoise": "denoise loop", "vae_decode": "VAE dec", "end_to_end": "end to end"}


def num(x, fmt: str = "{:.3g}", none: str = "–") -> str:
    """x formatted, `none` for None, NaN and infinities as Python writes them."""
    if x is None:
        return none
    return str(x) if isinstance(x, float) and not math.isfinite(x) else fmt.format(x)


def table(header: list[str], rows, left: int = 1) -> list[str]:
    """Markdown table lines: the first `left` columns left-aligned, the others right-aligned."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * left + "---:|" * (len(header) - left)]
            + ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows])


# ---- the machine ---------------------------------------------------------------------------------------

def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (none where there is no such file)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        first = f.read().split("\n\n")[0].splitlines()
        return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first)}
    return {}


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_info() -> dict:
    import torch
    cpu, ram = _cpuinfo(), None
    model = cpu.get("model name") or platform.processor() or platform.machine()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as f:
        ram = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    virt = "hypervisor" in cpu.get("flags", "").split()
    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "memory": p.total_memory, "compute_capability": f"{p.major}.{p.minor}",
               "cuda": torch.version.cuda}
    now = dt.datetime.now(dt.timezone.utc)
    family = f" (family {cpu['cpu family']} model {cpu['model']})" if "cpu family" in cpu else ""
    isa = torch.backends.cpu.get_cpu_capability()
    desc = (f"{model}{family}, {cpus} {'vCPUs (virtual machine)' if virt else 'cores'}, "
            f"{ram / GiB:.1f} GiB RAM, {isa}" if ram else f"{model}, {cpus} cores")
    if gpu:
        desc = f"{gpu['name']} ({gpu['memory'] / GiB:.0f} GiB), host: {desc}"
    return {
        "description": desc, "slug": slug(gpu["name"]) if gpu else f"{slug(model)}-{cpus}c",
        "cpu": {"model": model, "family": cpu.get("cpu family"), "model_number": cpu.get("model"),
                "cpus": cpus, "logical_cpus": os.cpu_count(), "virtual": virt, "isa": isa,
                "torch_threads": torch.get_num_threads()},
        "ram": ram, "gpu": gpu, "platform": platform.platform(), "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "triton",
                                              "diffusers", "transformers", "numpy")},
        "date": now.strftime("%Y-%m-%d"), "time_utc": now.isoformat(timespec="seconds"),
    }


def load_lines(result: dict) -> list[str]:
    """How loaded the machine was: 1-minute load average before the timing started and after it ended."""
    load = result.get("load")
    if not load:
        return []
    la = lambda x: "unknown" if not x else f"{x[0]:.2f}"  # noqa: E731
    waited = f" (after waiting {load['waited_seconds']:.0f} s; {la(load['first_seen'])} at first)" \
        if load.get("waited_seconds") else ""
    lines = [f"Machine load (1-minute load average, {load['cpus']} CPUs): {la(load['before'])} before the timing"
             f"{waited}, {la(load.get('after'))} after it (that one includes this benchmark's own threads); busy "
             f"above {load['busy_above']:.1f}.", ""]
    if load.get("busy_before"):
        lines += [f"**Warning: the machine was busy when the timing started (load average {la(load['before'])} on "
                  f"{load['cpus']} CPUs): these times are inflated and noisy; rerun on an idle machine before "
                  f"comparing them.**", ""]
    return lines


# ---- the report ----------------------------------------------------------------------------------------

@dataclass
class Report:
    """What a mode measured: the JSON, the Markdown body under the common heading, and whether the stage
    chart (PNG) goes with it. The writer adds the mode, preset, machine and load to the JSON."""
    title: str
    result: dict
    body: list[str] = field(default_factory=list)
    chart: bool = False
    preset: str | None = None  # in the file name and heading instead of --preset's (quant --ckpt_dir's model)
    failed: list[str] = field(default_factory=list)  # backends that failed: written, then exit 1


def finite(x):
    """x with every NaN and infinity (in dicts, lists and tuples) replaced by None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def free_stem(out: Path, stem: str) -> str:
    """`stem`, else `stem`-2, -3, ...: the first without a .json in `out` (an earlier run of the day is kept)."""
    name, n = stem, 1
    while (out / f"{name}.json").exists():
        n += 1
        name = f"{stem}-{n}"
    return name


def write(report: Report, mode: str, preset: str | None, machine: dict, load: dict | None, out) -> dict:
    """<out>/[<mode>-][<preset>-]<machine>-<date>[-N].{json,md[,png]} -> {"json": path, "md": path[, "png": path]}.
    The JSON is standard JSON: a NaN or infinity (PSNR of identical videos) is null there, since strict parsers
    reject Python's `Infinity`; the Markdown keeps `inf`."""
    r = {"mode": mode or "stages", "preset": preset, "machine": machine, "load": load, **report.result}
    v = machine["versions"]
    md = [f"# flf2v {report.title}" + (f": `{preset}`" if preset else "") + f" on {machine['description']}", "",
          f"{machine['time_utc']} · torch {v['torch']} · onnxruntime {v['onnxruntime'] or v['onnxruntime-gpu']} · "
          f"diffusers {v['diffusers']} · transformers {v['transformers']} · "
          f"{machine['cpu']['torch_threads']} torch threads", "", *load_lines(r), *report.body]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "-".join(s for s in (mode, preset, machine["slug"], machine["date"]) if s)
    base = out / free_stem(out, stem)
    from flf2v.runtime.media import replacing  # a run stopped while writing leaves no truncated table
    text = json.dumps(finite(r), indent=2, default=str, allow_nan=False) + "\n"
    writers = {"json": lambda tmp: tmp.write_text(text),
               "md": lambda tmp: tmp.write_text("\n".join(md).rstrip("\n") + "\n"),
               **({"png": lambda tmp: chart(r, tmp)} if report.chart else {})}
    paths = {}
    try:  # all or none: a full disk at the chart left the JSON and the table of a report without it
        for kind, write_to in writers.items():
            with replacing(base.parent / f"{base.name}.{kind}") as tmp:
                write_to(tmp)
            paths[kind] = base.parent / f"{base.name}.{kind}"
    except BaseException:
        for path in paths.values():
            path.unlink(missing_ok=True)
        raise
    return paths


def chart(result: dict, path: Path) -> None:
    """Bars per stage and backend (median, min-max whiskers, log scale) of a stage comparison."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {k: v for k, v in result["backends"].items() if v["status"] == "ok"}
    cols = [c for c in STAGE_LABELS if c != "denoise_step"]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / max(1, len(ok))
    for i, (name, b) in enumerate(ok.items()):
        st = [b["stages"].get(c) or {"median": 0, "min": 0, "max": 0} for c in cols]
        err = [[s["median"] - s["min"] for s in st], [s["max"] - s["median"] for s in st]]
        xs = [j + (i - (len(ok) - 1) / 2) * width for j in range(len(cols))]
        ax.bar(xs, [s["median"] for s in st], width, yerr=err, capsize=2, label=name)
    ax.set_xticks(range(len(cols)), [STAGE_LABELS[c] for c in cols])
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median, min–max)")
    job, m = result["job"], result["machine"]
    where = m["gpu"]["name"] if m["gpu"] else f"{m['cpu']['model']}, {m['cpu']['cpus']} CPUs"
    ax.set_title(f"flf2v `{result['preset']}`: {job['width']}x{job['height']}x{job['frames']}, {job['steps']} steps, "
                 f"{job['dtype']} · {where} · {m['date']}", fontsize=9)
    ax.legend()
    ax.grid(axis="y", which="both", alpha=0.3)
    load = result.get("load") or {}
    if load.get("busy_before"):  # the chart travels without the Markdown: it carries the warning too
        fig.text(0.5, 0.5, f"machine busy when timing started (load {load['before'][0]:.1f} on {load['cpus']} "
                           f"CPUs): times inflated", ha="center", va="center", fontsize=11, color="red", alpha=0.8,
                 bbox={"facecolor": "white", "edgecolor": "red", "alpha": 0.85})
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
