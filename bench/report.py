"""The machine description and the three outputs of a benchmark run: JSON (raw), Markdown, PNG chart."""
from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
from pathlib import Path

import torch

STAGE_LABELS = {"text_encoder": "T5", "image_encoder": "CLIP", "vae_encode": "VAE enc", "denoise_step": "1 step",
                "denoise": "denoise loop", "vae_decode": "VAE dec", "end_to_end": "end to end"}
GiB = 1024 ** 3


def _cpuinfo() -> dict[str, str]:
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                k, _, v = line.partition(":")
                info[k.strip()] = v.strip()
    except OSError:
        pass
    return info


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_info() -> dict:
    cpu = _cpuinfo()
    model = cpu.get("model name") or platform.processor() or platform.machine()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = None
    try:
        with open("/proc/meminfo") as f:
            ram = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
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


def stem(result: dict) -> str:
    return f"{result['preset']}-{result['machine']['slug']}-{result['machine']['date']}"


# ---- Markdown ------------------------------------------------------------------------------------------

def _s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _cell(stats: dict | None) -> str:
    if not stats:
        return "–"
    return f"{_s(stats['median'])} [{_s(stats['min'])}–{_s(stats['max'])}]" if stats["n"] > 1 else _s(stats["median"])


def _gib(b) -> str:
    return "–" if b is None else f"{b / GiB:.2f}"


def _diff(x: float | None) -> str:
    return "–" if x is None else f"{x:.2e}"


def _video_diff(name: str, b: dict) -> str:
    if b.get("video_reference") == name:
        return "(reference)"
    return _diff(b.get("video_max_abs_diff"))


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
             f"above {load['busy_above']:.1f}."]
    if load.get("busy_before"):
        lines += ["", f"**Warning: the machine was busy when the timing started (load average "
                      f"{la(load['before'])} on {load['cpus']} CPUs): these times are inflated and noisy; rerun on "
                      f"an idle machine before comparing them.**"]
    return lines


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def cost_lines(costs: dict, achieved: dict[str, str] | None = None) -> list[str]:
    """Markdown table of bench.cost.cost_table(); `achieved`: stage -> text for a GPU column."""
    lines = ["| stage | FLOPs | min GB (bf16) | H100 bf16 | H100 fp8 | H200 bf16 | H200 fp8 |"
             + (" achieved fraction of the floor (this GPU, bf16) |" if achieved else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if achieved else "")]
    for stage, c in costs.items():
        f = c["floor_s"]
        lines.append(f"| {STAGE_LABELS[stage]} | {c['flops']:.3g} | {c['min_bytes_bf16'] / 1e9:.3g} | "
                     + " | ".join(f"{f[k]:.3g} s" for k in ("H100 bf16", "H100 fp8", "H200 bf16", "H200 fp8")) + " |"
                     + (f" {achieved.get(stage, '')} |" if achieved else ""))
    return lines


def markdown(result: dict) -> str:
    r, m, job = result, result["machine"], result["job"]
    ok = {k: v for k, v in r["backends"].items() if v["status"] == "ok"}
    cols = ["text_encoder", "image_encoder", "vae_encode", "denoise_step", "denoise", "vae_decode", "end_to_end"]
    v = m["versions"]
    lines = [
        f"# flf2v benchmark: `{r['preset']}` on {m['description']}",
        "",
        f"{m['time_utc']} · torch {v['torch']} · onnxruntime {v['onnxruntime'] or v['onnxruntime-gpu']} · "
        f"diffusers {v['diffusers']} · transformers {v['transformers']} · {m['cpu']['torch_threads']} torch threads",
        "",
        f"Job: {job['task']}, {job['width']}x{job['height']}, {job['frames']} frames, {job['steps']} UniPC steps "
        f"(shift {job['shift']}), CFG {job['guide']}, {job['dtype']} on {job['device']}, seed {job['seed']}; "
        f"random weights in the official layout (model preset `{job['model_preset']}`). One warm-up run "
        f"({job['warmup_steps']} steps, excluded), then {job['repeats']} timed runs per backend in this process, "
        + ("in rounds of one run per backend with all backends loaded (peak memory: from the warm-up run, one "
           "backend loaded at a time)" if job.get("order") == "interleaved" else "one backend after another")
        + ". Seconds: median [min–max].",
        "",
        *(load_lines(r) + [""] if r.get("load") else []),
        "## Time per stage (s)",
        "",
        "| backend | " + " | ".join(STAGE_LABELS[c] for c in cols) + " | warm-up | outside network | load avg |",
        "|---|" + "---:|" * (len(cols) + 3),
    ]
    for name, b in r["backends"].items():
        if b["status"] != "ok":
            lines.append(f"| {name} | {b['status']} |" + " |" * (len(cols) + 2))
            continue
        out = b.get("outside_network_fraction")
        load = [x[0] for x in (b.get("load_avg_before"), b.get("load_avg_after")) if x]
        lines.append(f"| {name} | " + " | ".join(_cell(b["stages"].get(c)) for c in cols)
                     + f" | {_s(b['warmup_seconds'])} | {'–' if out is None else f'{100 * out:.1f}%'} | "
                     + "→".join(f"{x:.1f}" for x in load) + " |")
    lines += ["", "## Speedups (ratio of medians, same process and machine)", "",
              "| backend | vs torch eager, end to end | vs torch eager, denoise loop | vs diffusers, end to end "
              "| vs diffusers, denoise loop | max abs diff of the video vs the torch reference |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, b in ok.items():
        sp = b.get("speedup", {})
        lines.append(f"| {name} | {_ratio(sp.get('torch', {}).get('end_to_end'))} | "
                     f"{_ratio(sp.get('torch', {}).get('denoise'))} | "
                     f"{_ratio(sp.get('diffusers', {}).get('end_to_end'))} | "
                     f"{_ratio(sp.get('diffusers', {}).get('denoise'))} | "
                     f"{_video_diff(name, b)} |")
    if r.get("targets"):
        lines += ["", "Targets (measured, not asserted): " + "; ".join(r["targets"]) + "."]
    lines += ["", "## Peak memory per stage (GiB, host RSS" + (", CUDA max allocated" if m["gpu"] else "") + ")", "",
              "| backend | before load | " + " | ".join(STAGE_LABELS[c] for c in cols if c != "denoise_step")
              + " |", "|---|" + "---:|" * (len(cols))]
    for name, b in ok.items():
        cells = []
        for c in cols:
            if c == "denoise_step":
                continue
            h, g = b["host_peak"].get(c), b["cuda_peak"].get(c)
            cells.append(_gib(h) + (f" / {_gib(g)}" if g is not None else ""))
        lines.append(f"| {name} | {_gib(b['rss_before_load'])} | " + " | ".join(cells) + " |")
    built = {n: b for n, b in ok.items() if b.get("engine_build_seconds") is not None}
    if built:
        lines += ["", "## Engine builds (`flf2v-build` in a child process, before the runs)", "",
                  "| backend | build (s) | folder size (MiB) |", "|---|---:|---:|"]
        lines += [f"| {n} | {b['engine_build_seconds']:.1f} | "
                  f"{(b.get('engine_bytes') or 0) / 2**20:.1f} |" for n, b in built.items()]
    achieved = None
    if m["gpu"]:
        achieved = {stage: ", ".join(f"{n} {100 * b['floor_fraction'][stage]:.1f}%" for n, b in ok.items()
                                     if b.get("floor_fraction", {}).get(stage) is not None) for stage in r["cost"]}
    lines += ["", "## Cost model (FLOPs, minimum bytes, floor time on one GPU)", ""] + cost_lines(r["cost"], achieved)
    lines += ["", "## Notes", ""] + [f"- {n}" for n in r.get("notes", [])]
    return "\n".join(lines) + "\n"


# ---- chart ---------------------------------------------------------------------------------------------

def chart(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {k: v for k, v in result["backends"].items() if v["status"] == "ok"}
    cols = ["text_encoder", "image_encoder", "vae_encode", "denoise", "vae_decode", "end_to_end"]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / max(1, len(ok))
    for i, (name, b) in enumerate(ok.items()):
        st = [b["stages"].get(c) for c in cols]
        med = [s["median"] if s else 0 for s in st]
        err = [[s["median"] - s["min"] if s else 0 for s in st], [s["max"] - s["median"] if s else 0 for s in st]]
        xs = [j + (i - (len(ok) - 1) / 2) * width for j in range(len(cols))]
        ax.bar(xs, med, width, yerr=err, capsize=2, label=name)
    ax.set_xticks(range(len(cols)), [STAGE_LABELS[c] for c in cols])
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median, min–max)")
    job = result["job"]
    m = result["machine"]
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


def write_outputs(result: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / stem(result)
    paths = {"json": base.with_suffix(".json"), "md": base.with_suffix(".md"), "png": base.with_suffix(".png")}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["md"].write_text(markdown(result))
    chart(result, paths["png"])
    return paths


# ---- side studies (flf2v-bench fewstep, cache): one random checkpoint in a work folder, one result file ----

@contextlib.contextmanager
def side_study(kind: str, preset_name: str, work=None):
    """(work folder, random checkpoint of `preset_name` in it) for `flf2v-bench <kind>`; a temporary folder
    unless `work` is given (then the checkpoint and engines are kept and reused)."""
    import tempfile

    from flf2v.models.make_tiny import write_tiny_checkpoint
    tmp = None if work else tempfile.TemporaryDirectory(prefix=f"flf2v-{kind}-")
    folder = Path(work or tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        ckpt = folder / "ckpt"
        if not (ckpt / "config.json").exists():
            write_tiny_checkpoint(ckpt, preset_name, seed=0)
        yield folder, ckpt
    finally:
        if tmp is not None:
            tmp.cleanup()


def write_side_study(out, kind: str, preset_name: str, machine: dict, result: dict, markdown: str) -> Path:
    """<out>/<kind>-<preset>-<machine>-<date>.{json,md}; prints the Markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{kind}-{stem({'preset': preset_name, 'machine': machine})}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    base.with_suffix(".md").write_text(markdown)
    print(markdown)
    return base
