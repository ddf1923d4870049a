"""`flf2v-bench export-memory --work DIR [--source lazy|ckpt] [--shape 720p] [--json FILE]`: peak memory and
time of exporting the full-size FLF2V-14B DiT (16.4 B parameters, random weights) to ONNX, streamed
(export/onnx_export.py): it must fit a 24 GiB machine.

Memory is anonymous RSS (`RssAnon`), sampled by a thread: the pages of memory-mapped weight files count in
plain RSS but are file-backed and reclaimable. `--source lazy` makes each checkpoint tensor on demand (fp32, as
the official shards), so only the ONNX output (~33 GB bf16) touches the disk; `--source ckpt` first writes a
sharded checkpoint in `--ckpt_dtype` (the fp32 one is 65.6 GB) and exports through the real checkpoint reader.
Everything written under --work is deleted at the end unless --keep.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from flf2v.models import checkpoint as ck
from flf2v.models.config import get_preset

from .measure import BadInput, status_bytes, timed
from .report import Report, table


def add_args(ap) -> None:
    ap.add_argument("--source", default="lazy", choices=("lazy", "ckpt"))
    ap.add_argument("--ckpt_dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--shape", default="720p")
    ap.add_argument("--batch", type=int, default=2, choices=(1, 2))
    ap.add_argument("--layers", type=int, default=None, help="cut the DiT to N blocks (quick check)")
    ap.add_argument("--json", default=None, help="also append the result as one JSON line to this file")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and ONNX files")


def rss_anon_bytes() -> int:
    """Anonymous resident memory of this process (RssAnon), in bytes."""
    if (n := status_bytes("RssAnon")) is None:
        raise RuntimeError("RssAnon missing from /proc/self/status (Linux 4.5+ needed)")
    return n


class PeakRssAnon:
    """`with PeakRssAnon() as m: ...` then m.peak (bytes, max over samples every `interval` s)."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start = self.peak = rss_anon_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


def dit_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of the official DiT checkpoint (from a meta-device build)."""
    from flf2v.models.dit import WanDiT
    with torch.device("meta"):
        net = WanDiT(cfg)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def lazy_source(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict:
    """key -> getter making a fresh random fp32 tensor: what reading one official shard tensor costs."""
    def make(shape, i):
        return torch.empty(shape).uniform_(-0.02, 0.02, generator=torch.Generator().manual_seed(seed + i))
    return {k: (lambda s=s, i=i: make(s, i)) for i, (k, s) in enumerate(shapes.items())}


def write_shards(folder: Path, cfg_json: dict, shapes: dict[str, tuple[int, ...]], dtype=torch.float32) -> None:
    """lazy_source(shapes) in `dtype` as an official-layout DiT (config.json, safetensors shards of at most 2 GiB,
    a larger tensor alone, and their index), written one shard at a time."""
    from flf2v.models.make_tiny import write_dit_shards
    groups, size = [[]], 0
    for k, s in shapes.items():
        n = math.prod(s) * dtype.itemsize
        if groups[-1] and size + n > 2 << 30:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    folder.mkdir(parents=True, exist_ok=True)
    write_dit_shards(folder, cfg_json, {k: (lambda g=g: g().to(dtype)) for k, g in lazy_source(shapes).items()}, groups)


def measure(work: Path, source: str = "lazy", shape: str = "720p", batch: int = 2,
            ckpt_dtype=torch.bfloat16, layers: int | None = None) -> dict:
    """Export dit_b<batch> of flf2v-14B (bf16), streamed, into `work`, the DiT cut to `layers` blocks if given."""
    from flf2v.export import contracts as C
    from flf2v.export.onnx_export import export_graph
    preset = get_preset("flf2v-14B")
    cfg = dataclasses.replace(preset.dit, num_layers=layers or preset.dit.num_layers)
    eshape, shapes = C.get_shape(preset, shape), dit_shapes(cfg)
    graph = C.get_graph(preset, eshape, "bf16", f"dit_b{batch}")
    ckpt, src = work / "ckpt", None
    result = {"source": source, "graph": graph.name, "shape": shape, "layers": cfg.num_layers}
    if source == "ckpt":
        t, _ = timed(lambda: write_shards(ckpt, cfg.to_json_dict(), shapes, ckpt_dtype))
        result["ckpt_write_seconds"] = round(t, 1)
        result["ckpt_bytes"] = sum(f.stat().st_size for f in ckpt.iterdir())
    else:
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / ck.DIT_CONFIG).write_text(json.dumps(cfg.to_json_dict()))
        src = lazy_source(shapes)
    out = work / "onnx" / f"{graph.name}.onnx"
    with PeakRssAnon() as m:
        t, _ = timed(lambda: export_graph(graph, ckpt, out, preset=preset, stream=True, source=src,
                                          ranges=eshape.envelope() if graph.dynamic else None))
    return result | {"seconds": round(t, 1), "rss_anon_start_gib": round(m.start / 2**30, 3),
                     "rss_anon_peak_gib": round(m.peak / 2**30, 3), "onnx_bytes": out.stat().st_size,
                     "data_bytes": out.with_name(out.name + ".data").stat().st_size,
                     "parameters": sum(math.prod(s) for s in shapes.values())}


def check_shape(name: str) -> None:
    """--shape, before the disk check and the load wait: a wrong one was a traceback once the export began."""
    from flf2v.export import contracts as C
    try:
        C.get_shape(get_preset("flf2v-14B"), name)
    except ValueError as e:
        raise BadInput(f"--shape: {e}") from None


def run(s) -> Report:
    a = s.args
    check_shape(a.shape)
    free, scale = shutil.disk_usage(s.work).free, (a.layers or 40) / 40
    need = scale * (33 + (33 if a.ckpt_dtype == "bf16" else 66) * (a.source == "ckpt")) * 10**9
    if free < need * 1.05:
        # free rounded down, need up: "33 GB free, 33 GB needed" was a refusal
        raise BadInput(f"{math.floor(free / 1e8) / 10:.1f} GB free at {s.work}, {math.ceil(need * 1.05 / 1e8) / 10:.1f} "
                       f"GB needed; give --work a larger disk")
    s.settle()  # before the scratch folder: a Ctrl-C while waiting left it behind
    work = Path(tempfile.mkdtemp(prefix="export-memory-", dir=s.work))
    try:
        r = measure(work, a.source, a.shape, a.batch, torch.bfloat16 if a.ckpt_dtype == "bf16" else torch.float32,
                    a.layers)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(r) + "\n")
    return Report("full-size DiT export memory", r, table(["quantity", "value"], [[k, v] for k, v in r.items()]))
