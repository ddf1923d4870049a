"""Benchmark suite: the cost model against the spec's numbers and torch's FLOP counter, the diffusers peer
pipeline against our networks on the same checkpoint, and one tiny end-to-end run of `flf2v-bench`
(structure of its outputs only: timings are never asserted)."""
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from torch.utils.flop_counter import FlopCounterMode

from flf2v.bench import cost
from flf2v.models.config import get_preset

FULL = get_preset("flf2v-14B")
LATENT_720P = (21, 90, 160)  # 81 frames at 1280x720 (spec wan21-flf2v.md, "FLF2V data flow" step 1)
# Where the expected figures below come from:
#   [E&T] /work/shared/spec/engines-and-targets.md (repo spec), "Cost of one FLF2V-14B video": per-layer FLOPs,
#         6.55e15 per forward, ~71% self-attention, 662 s / 331 s floors at 989 dense bf16 TFLOP/s, DiT 32.8 GB
#         and T5 11.4 GB in bf16.
#   [W21] /work/shared/spec/wan21-flf2v.md: DiT size 16,395,536,704 (re-derived from the config dimensions in
#         test_dit.official_size), VAE 126.9 M parameters, 75,600 tokens at 720p.
#   [NV]  NVIDIA H100 / H200 SXM datasheets: 989 TFLOP/s dense bf16 (1979 fp8), HBM 3.35 TB/s (H100).


def close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * abs(b)


# ---- cost model against the spec (engines-and-targets.md), the independent truth ------------------------

def test_dit_flops_match_spec():
    L = cost.dit_tokens(FULL.dit, LATENT_720P)
    assert L == 75_600  # [W21]
    layer = cost.dit_layer_flops(FULL.dit, L)
    # [E&T] gives 3 significant digits: agree to rounding
    for name, want in {"qkvo": 1.59e13, "self_attention": 1.17e14, "cross_attention": 9.6e12, "ffn": 2.14e13}.items():
        assert close(layer[name], want, 0.006), (name, layer[name], want)
    assert close(sum(layer.values()), 1.64e14, 0.005)
    assert close(sum(layer.values()) / cost.dit_forward_flops(FULL.dit, LATENT_720P), 1 / 40, 0.001)  # layers ~all
    fwd = cost.dit_forward_flops(FULL.dit, LATENT_720P)
    assert close(fwd, 6.55e15, 0.005), fwd  # [E&T]
    assert close(layer["self_attention"] * 40 / fwd, 0.71, 0.01)  # [E&T] "self-attention is ~71% of the work"


def test_dit_floor_and_weights_match_spec():
    from test_dit import official_size

    loop = cost.dit_cost(FULL.dit, LATENT_720P, calls=100)  # 50 steps x CFG 2
    assert close(loop.total_flops, 6.55e17, 0.005)  # [E&T]
    h100 = cost.GPUS["H100"]
    assert h100.bf16 == 989e12 and cost.GPUS["H200"].bf16 == 989e12  # [NV], [E&T]
    assert close(loop.floor(h100, "bf16"), 662, 0.005), loop.floor(h100, "bf16")  # [E&T]
    assert close(loop.floor(h100, "fp8"), 331, 0.005), loop.floor(h100, "fp8")  # [E&T]
    assert cost.dit_params(FULL.dit) == official_size("flf2v")[0] == 16_395_536_704  # [W21], derived in test_dit
    assert close(cost.dit_params(FULL.dit) * 2, 32.8e9, 0.002)  # [E&T] 32.8 GB bf16
    assert close(cost.t5_params(FULL.t5) * 2, 11.4e9, 0.005)  # [E&T] T5 encoder 11.4 GB bf16 (the .pth's size)
    vae = cost.vae_params(FULL.vae, "enc") + cost.vae_params(FULL.vae, "dec")
    assert close(vae, 126.9e6, 0.001), vae  # [W21] 126.9 M parameters


def test_floor_is_compute_or_memory_bound():
    h100 = cost.GPUS["H100"]
    c = cost.Cost(flops=1e12, params=10**10, io_elements=0)  # 20 GB of bf16 weights, 1 TFLOP: memory bound
    assert c.floor(h100, "bf16") == pytest.approx(20e9 / 3.35e12)  # [NV] H100 SXM HBM3: 3.35 TB/s
    assert c.floor(h100, "fp8") == pytest.approx(10e9 / 3.35e12)
    c = cost.Cost(flops=1e15, params=10, io_elements=0, calls=3)
    assert c.floor(h100, "bf16") == pytest.approx(3e15 / 989e12)


def _counted(module: torch.nn.Module, *inputs) -> tuple[float, int]:
    """(FLOPs by torch's FlopCounterMode, parameter count) of one forward on the meta device."""
    module = module.to("meta")
    with FlopCounterMode(display=False) as counter:
        module(*inputs)
    return float(counter.get_total_flops()), sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_formulas_agree_with_flop_counter(name):
    from flf2v.models.clip import CLIPVisual
    from flf2v.models.dit import WanDiT
    from flf2v.models.t5 import UMT5Encoder

    p = get_preset(name)
    d, t, c = p.dit, p.t5, p.clip
    latent = (3, 8, 12)
    meta = dict(device="meta")
    with torch.device("meta"):
        dit, t5, clip = WanDiT(d), UMT5Encoder(t), CLIPVisual(c)
    flops, params = _counted(dit, torch.empty(1, d.out_dim, *latent, **meta),
                             torch.zeros(1, dtype=torch.int64, **meta), torch.empty(1, d.text_len, d.text_dim, **meta),
                             torch.empty(1, d.clip_tokens, d.clip_dim, **meta),
                             torch.empty(1, d.in_dim - d.out_dim, *latent, **meta))
    # the counter sees the same matrix products; it leaves out nothing the formula counts
    assert close(cost.dit_forward_flops(d, latent), flops, 1e-9), (cost.dit_forward_flops(d, latent), flops)
    assert cost.dit_params(d) == params
    flops, params = _counted(t5, torch.zeros(2, t.text_len, dtype=torch.int64, **meta),
                             torch.ones(2, t.text_len, dtype=torch.int64, **meta))
    tc = cost.t5_cost(t)
    assert close(tc.flops, flops, 1e-9), (tc.flops, flops)
    assert cost.t5_params(t) == params
    flops, params = _counted(clip, torch.empty(2, 3, c.image_size, c.image_size, **meta))
    assert close(cost.clip_cost(c, 2).flops, flops, 1e-9), (cost.clip_cost(c, 2).flops, flops)
    assert cost.clip_params(c) == params


def test_vae_chunk_extrapolation_equals_whole_clip_count():
    from flf2v.models.vae import WanVAE

    cfg = get_preset("tiny").vae
    frames, h, w = 9, 32, 48
    with torch.device("meta"):
        vae = WanVAE(cfg)
    vae = vae.to("meta")
    with FlopCounterMode(display=False) as counter:
        z = vae.encode(torch.empty(1, 3, frames, h, w, device="meta"))
    assert cost.vae_cost(cfg, "enc", frames, h, w).flops == counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        vae.decode(torch.empty(z.shape, device="meta"))
    assert cost.vae_cost(cfg, "dec", frames, h, w).flops == counter.get_total_flops()


def test_cost_table_sums_stages():
    p = get_preset("small")
    table = cost.cost_table(p, 256, 144, 17, 10)
    parts = ("text_encoder", "image_encoder", "vae_encode", "denoise", "vae_decode")
    assert table["end_to_end"]["flops"] == pytest.approx(sum(table[s]["flops"] for s in parts))
    assert table["denoise"]["flops"] == pytest.approx(10 * table["denoise_step"]["flops"])
    for k in ("H100 bf16", "H100 fp8", "H200 bf16", "H200 fp8"):
        assert table["end_to_end"]["floor_s"][k] == pytest.approx(sum(table[s]["floor_s"][k] for s in parts))


# ---- the diffusers peer on the same checkpoint ---------------------------------------------------------

@pytest.fixture(scope="module")
def peer(tiny_ckpt):
    from flf2v.bench.diffusers_peer import build_pipeline
    pipe = build_pipeline(tiny_ckpt)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_peer_schedule_equals_ours(peer):
    from flf2v.runtime.scheduler import make_sampler

    p = get_preset("tiny")
    for steps in (4, 50):
        peer.scheduler.set_timesteps(steps)
        ours = make_sampler("unipc", steps, p.sample_shift)
        assert torch.equal(peer.scheduler.timesteps, ours.timesteps)
        assert torch.equal(peer.scheduler.sigmas.double(), ours.sigmas)


@torch.no_grad()
def test_peer_networks_equal_ours(peer, tiny_ckpt):
    """Each network of the peer, loaded from the checkpoint files through diffusers_peer, against ours."""
    from flf2v.models import checkpoint as ck

    p = get_preset("tiny")
    g = torch.Generator().manual_seed(3)
    report = {}

    dit = ck.load_dit(tiny_ckpt, torch.float32, p)
    d = p.dit
    x, y = torch.randn(2, 16, 3, 8, 8, generator=g), torch.randn(2, 20, 3, 8, 8, generator=g)
    ctx, clip = torch.randn(2, d.text_len, d.text_dim, generator=g), torch.randn(2, d.clip_tokens, d.clip_dim, generator=g)
    # small timesteps: diffusers' fp32 time sinusoid differs from the official float64 one by up to ~6e-5 at
    # t=999 (see test_dit), which is not what this test is about
    t = torch.tensor([3, 17])
    want = dit(x, t, ctx, clip, y)
    got = peer.transformer(torch.cat([x, y], 1), t, ctx, encoder_hidden_states_image=clip.reshape(-1, 257, d.clip_dim),
                           return_dict=False)[0]
    report["dit"] = rel_err(got, want)

    ids = torch.randint(3, p.t5.vocab, (2, p.t5.text_len), generator=g)
    mask = (torch.arange(p.t5.text_len)[None] < torch.tensor([[40], [9]])).long()
    want = ck.load_t5(tiny_ckpt, torch.float32, p)(ids * mask, mask)
    got = peer.text_encoder(ids * mask, mask).last_hidden_state * mask[..., None]
    report["t5"] = rel_err(got, want)

    pixels = torch.randn(2, 3, 224, 224, generator=g)
    want = ck.load_clip(tiny_ckpt, torch.float32, p)(pixels)
    got = peer.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    report["clip"] = rel_err(got, want)

    video = torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1
    vae = ck.load_vae(tiny_ckpt, torch.float32, p)
    mean, std = torch.tensor(p.vae.mean).view(1, -1, 1, 1, 1), torch.tensor(p.vae.std).view(1, -1, 1, 1, 1)
    want = vae.encode(video)
    got = (peer.vae.encode(video).latent_dist.mode() - mean) / std
    report["vae_encode"] = rel_err(got, want)
    print("peer vs ours (max abs, max rel): " + ", ".join(f"{k} {a:.2e} / {r:.2e}" for k, (a, r) in report.items()))
    for name, (a, r) in report.items():
        assert r < 1e-5, f"{name}: max abs {a:.3e}, max rel {r:.3e}"


def test_peer_pipeline_makes_a_video(peer, demo_frames):
    from PIL import Image

    first, last = (Image.open(f).convert("RGB").resize((64, 64)) for f in demo_frames)
    out = peer(image=first, last_image=last, prompt="a red ball", negative_prompt="", height=64, width=64,
               num_frames=9, num_inference_steps=1, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
               output_type="pt")
    video = out.frames
    assert video.shape == (1, 9, 3, 64, 64) and torch.isfinite(video).all()
    assert 0 <= video.min() and video.max() <= 1


# ---- flf2v-bench end to end (structure only) -------------------------------------------------------------

def test_bench_cli_writes_json_markdown_chart(tmp_path, tiny_ckpt, capsys):
    from flf2v.bench.cli import main

    rc = main(["--preset", "tiny", "--out", str(tmp_path), "--ckpt_dir", str(tiny_ckpt), "--work", str(tmp_path / "w"),
               "--backends", "torch,trt,diffusers", "--steps", "1", "--repeats", "2", "--idle_wait", "0"])
    assert rc == 0
    files = {p.suffix: p for p in tmp_path.iterdir() if p.is_file()}
    assert set(files) == {".json", ".md", ".png"}
    stem = files[".json"].stem
    assert stem.startswith("tiny-") and stem.count("-") >= 4  # <preset>-<machine>-<YYYY-MM-DD>
    res = json.loads(files[".json"].read_text())
    assert res["machine"]["cpu"]["cpus"] >= 1 and res["machine"]["versions"]["torch"]
    b = res["backends"]
    assert b["trt"]["status"].startswith("unavailable: ") if not torch.cuda.is_available() else True
    for name in ("torch", "diffusers"):
        assert b[name]["status"] == "ok", b[name]["status"]
        assert set(b[name]["stages"]) == {"text_encoder", "image_encoder", "vae_encode", "denoise", "denoise_step",
                                          "vae_decode", "end_to_end"}
        assert all(v["n"] == 2 and v["median"] > 0 for v in b[name]["stages"].values())
        assert b[name]["host_peak"]["end_to_end"] > 0
        assert b[name]["video_reference"] == "torch"
        assert b[name]["video_run_to_run_max_abs_diff"] == 0.0  # same seed: the same video every run
    assert b["diffusers"]["speedup"]["torch"]["end_to_end"] > 0
    # every backend against the torch reference, not the reference against itself
    assert b["torch"]["video_max_abs_diff"] is None
    # the peer resizes with PIL (CLIP input) where ours uses torch: close, never equal
    assert 0 < b["diffusers"]["video_max_abs_diff"] < 0.5, b["diffusers"]["video_max_abs_diff"]
    load = res["load"]
    assert len(load["before"]) == len(load["after"]) == 3 and load["cpus"] == res["machine"]["cpu"]["cpus"]
    roof = res["gemm_roof"]
    assert roof["n"] == 2048 and roof["dtype"] == "float32" and roof["flops_per_s"] > 0, roof
    for name in ("torch", "diffusers"):  # achieved FLOP/s of the loop = the cost model's FLOPs / its median time
        achieved = res["cost"]["denoise"]["flops"] / b[name]["stages"]["denoise"]["median"]
        assert close(b[name]["gemm_roof_fraction"]["denoise"] * roof["flops_per_s"], achieved, 1e-9)
    assert any(t.startswith("denoise loop ≥ 90% of the measured GEMM roof (") for t in res["targets"])
    md = files[".md"].read_text()
    assert "| torch |" in md and "| diffusers |" in md and "unavailable" in md
    assert "Machine load (1-minute load average" in md and "(reference)" in md
    assert "Achieved fraction of this machine's measured GEMM roof (" in md
    assert files[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gemm_roof_is_the_best_product_rate(monkeypatch):
    from flf2v.bench import measure
    seconds = iter([0.4, 0.1, 0.3, 0.2, 0.5])  # one clock per timed product, after the untimed warm-up
    monkeypatch.setattr(measure, "start_clock", lambda device: lambda: next(seconds))
    roof = measure.gemm_roof(torch.device("cpu"), torch.float32, n=64, repeats=5)
    assert roof["seconds"] == 0.1 and close(roof["flops_per_s"], 2 * 64 ** 3 / 0.1, 1e-12), roof
    assert roof["dtype"] == "float32" and roof["threads"] == torch.get_num_threads()


def test_bench_help_lists_modes_and_bad_flags_exit_2(capsys):
    from flf2v.bench.cli import DEFAULT_WORK, main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f"flf2v-bench {m}" in out for m in ("export-memory", "fewstep", "cache",
                                                                          "parallel")), out
    assert str(DEFAULT_WORK) in " ".join(out.split()) and DEFAULT_WORK.is_absolute()  # engines kept between runs
    for argv in (["--preset", "tiny", "--backends", "foo"], ["fewstep", "--preset", "720p"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()  # one line, as the other commands' (usage came first)
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("flf2v-bench"), err


@pytest.mark.parametrize("argv, says", [
    (["--preset", "tiny", "--out", "{file}"], "--out {file}: {file} is a file, not a folder"),
    (["quant", "--out", "{file}/sub"], "--out {file}/sub: {file} is a file, not a folder"),
    (["export-memory", "--work", "{file}"], "--work {file}: {file} is a file, not a folder"),
    (["--preset", "tiny", "--repeats", "0"], "--repeats 0 must be a positive integer"),
    (["fewstep", "--steps", "-1"], "--steps -1 must be a positive integer"),
    (["--preset", "tiny", "--idle_wait", "-5"], "--idle_wait -5 must be 0"),
    (["memory", "--idle_wait", "inf"], "--idle_wait inf must be 0"),  # waited for ever on a busy machine
    (["cache", "--preset", "tiny", "--steps", "4"], "calibration needs at least 8 steps"),
    (["--preset", "tiny", "--device", "cuda:0"], "--device cuda:0: no CUDA GPU"),
    (["--preset", "tiny", "--ckpt_dir", "{tmp}/none"], "{tmp}/none: not a directory"),
    (["--preset", "tiny", "--ckpt_dir", "{i2v}"], "this checkpoint holds another"),
    # another model of the same task ran with tiny's config (exit 0), or failed every row (small)
    (["--preset", "tiny", "--ckpt_dir", "{4h}"], "--preset tiny runs model preset tiny (flf2v), this checkpoint "
                                                 "holds another (tiny-4h, flf2v); give a tiny checkpoint "
                                                 "(`flf2v-make-tiny --preset tiny DIR` writes one) or drop --ckpt_dir"),
    (["--preset", "small", "--ckpt_dir", "{tiny}"], "holds another (tiny, flf2v); give a small checkpoint"),
    (["export-memory", "--shape", "foo"], "--shape: unknown shape 'foo' for flf2v-14B; choose one of "),
    (["--preset", "tiny", "--backends", "trt,trt-dynamic"], "none of them runs without a CUDA GPU"),
])
def test_bench_bad_input_is_refused_before_any_work(tmp_path, capsys, monkeypatch, argv, says):
    """Each was found only after minutes of building and measuring (or became a failed row and exit 0)."""
    import torch

    from flf2v.bench import cli
    if ("cuda:0" in argv or "trt,trt-dynamic" in argv) and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is usable here")
    monkeypatch.setattr(cli, "wait_for_idle", lambda *a: pytest.fail("work began"))
    monkeypatch.setattr(cli.Session, "checkpoint", lambda *a: pytest.fail("work began"))
    (tmp_path / "f").write_text("x")
    fill = {"file": str(tmp_path / "f"), "tmp": str(tmp_path)}
    for name, model in (("i2v", "tiny-i2v"), ("4h", "tiny-4h"), ("tiny", "tiny")):
        fill[name] = str(tmp_path / name)
        if f"{{{name}}}" in argv:
            from flf2v.models.make_tiny import write_tiny_checkpoint
            write_tiny_checkpoint(tmp_path / name, model)
    argv = [a.format(**fill) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert cli.main([*argv, "--work", str(tmp_path / "w")] if "--work" not in argv else argv) == 2
    err = capsys.readouterr().err
    assert says.format(**fill) in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "w").exists()  # no empty work folder either


def test_a_report_never_replaces_an_earlier_one_of_the_day(tmp_path):
    """A second run into one folder overwrote the first (the names hold the date, not the time)."""
    from flf2v.bench.report import Report, machine_info, write
    machine = machine_info()
    first = write(Report("t", {"run": 1}), "quant", "tiny", machine, None, tmp_path)
    second = write(Report("t", {"run": 2}), "quant", "tiny", machine, None, tmp_path)
    assert second["json"].name == first["json"].stem + "-2.json", (first, second)
    assert json.loads(first["json"].read_text())["run"] == 1 and json.loads(second["json"].read_text())["run"] == 2


@pytest.mark.parametrize("show_progress", [False, True])
def test_a_child_build_that_fails_is_reported_with_its_error(tmp_path, capfd, show_progress):
    """With its progress shown, the child's stderr went to the terminal only: the report said
    "flf2v.export.build failed (exit 2): " and nothing after it."""
    from flf2v.bench.measure import ChildFailed, run_module
    with pytest.raises(ChildFailed) as e:
        run_module("flf2v.export.build", "--ckpt_dir", str(tmp_path / "none"), show_progress=show_progress)
    assert str(e.value) == (f"flf2v.export.build failed (exit 2): flf2v-build: error: --ckpt_dir {tmp_path / 'none'}: "
                            f"no such directory"), str(e.value)
    assert ("no such directory" in capfd.readouterr().err) == show_progress  # shown live as well


def test_a_bench_stopped_stops_its_child(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM to flf2v-bench left its flf2v-build child running, orphaned, exporting into --work."""
    import os
    import sys
    import time
    from flf2v.bench.measure import run_module
    (tmp_path / "slow_child.py").write_text(
        "import os, sys, time\n"
        "def main(argv):\n"
        "    open(argv[0], 'w').write(str(os.getpid()))\n"
        "    print('exporting', flush=True)\n"
        "    time.sleep(120)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))

    class Interrupted:  # the Ctrl-C lands while the child's progress is relayed
        def write(self, text):
            raise KeyboardInterrupt

        def flush(self):
            pass
    monkeypatch.setattr(sys, "stderr", Interrupted())
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_module("slow_child", str(tmp_path / "pid"), show_progress=True)
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):  # stopped and reaped, not left running
        os.kill(pid, 0)
    assert time.monotonic() - t0 < 60


def test_a_report_stopped_while_writing_leaves_no_truncated_file(tmp_path, monkeypatch):
    """The chart failed (or Ctrl-C came) halfway through its file: a truncated PNG was left as a result; then
    the JSON and table were left without their chart (a report is written all or none)."""
    from flf2v.bench import report as R

    def half_a_chart(result, path):
        Path(path).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "chart", half_a_chart)
    with pytest.raises(KeyboardInterrupt):
        R.write(R.Report("t", {"run": 1}, chart=True), "quant", "tiny", R.machine_info(), None, tmp_path)
    assert not list(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())


def test_a_full_disk_at_out_is_one_line_and_no_report(tmp_path, monkeypatch, capsys):
    """A full disk at --out was two chained tracebacks, the JSON and table kept without their chart."""
    import errno

    from flf2v.bench import cli, compare
    from flf2v.bench import report as R

    def full(result, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(compare, "run", lambda session: R.Report("t", {"run": 1}, chart=True))
    monkeypatch.setattr(R, "chart", full)
    out = tmp_path / "out"
    assert cli.main(["--preset", "tiny", "--out", str(out), "--work", str(tmp_path / "w"), "--idle_wait", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flf2v-bench: error: No space left on device (") and err.endswith(
        "); free space or choose another --out or --work; no report was written") and "\n" not in err, err
    assert not list(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_a_failed_backend_is_reported_and_exits_1_without_an_empty_chart(tmp_path, tiny_ckpt, monkeypatch, capsys):
    """Every backend failed: the report said so, yet the exit code was 0, an empty chart was drawn, and the Job
    line said "random weights" of a run on --ckpt_dir's."""
    from flf2v.bench import cli, compare

    from flf2v.bench.runners import Unavailable

    class Broken:  # fails at its load, as a backend that cannot run this checkpoint; trt: unavailable, no failure
        build_seconds = folder = None

        def __init__(self, name, *a):
            self.name = name

        def load(self):
            raise Unavailable("no GPU") if self.name == "trt" else RuntimeError("deliberate")

        def close(self):
            pass
    monkeypatch.setattr(compare, "OursRunner", Broken)
    monkeypatch.setattr(compare, "gemm_roof", lambda *a: {"flops_per_s": 1e9, "n": 8, "dtype": "float32",
                                                          "threads": 1})
    out = tmp_path / "out"
    rc = cli.main(["--preset", "tiny", "--backends", "torch,trt", "--ckpt_dir", str(tiny_ckpt), "--steps", "1",
                   "--out", str(out), "--work", str(tmp_path / "w"), "--idle_wait", "0", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err
    files = {f.suffix: f for f in out.iterdir()}
    assert set(files) == {".json", ".md"}, files  # no chart without a bar to draw
    assert err[-1] == f"flf2v-bench: error: torch failed; see {files['.md']}", err  # trt: unavailable
    res = json.loads(files[".json"].read_text())
    assert res["job"]["ckpt_dir"] == str(tiny_ckpt) and res["backends"]["torch"]["status"].startswith("failed: ")
    assert f"weights of `{tiny_ckpt}` (model preset `tiny`)" in files[".md"].read_text()


def test_a_failed_parallel_layout_is_a_row_and_exit_1(tmp_path, capsys, monkeypatch):
    """A launch whose rank aborted (gloo's "terminate called without an active exception", seen under load) or
    that hung was a traceback, and the layouts measured before it were lost with the report; an abort after the
    result was written keeps the measurement; a kept --work's old result is never read as a new one."""
    import subprocess

    from flf2v.bench import cli, parallel
    real, abort = subprocess.run, "terminate called without an active exception"
    work = tmp_path / "w"
    work.mkdir()
    (work / "parallel-2-cfg_parallel.json").write_text('{"step_s": 9.0}')  # a stale result: the launch hangs

    def launch(cmd, **kw):
        if "flf2v.bench.parallel" not in cmd:  # the machine's description (lscpu, ...)
            return real(cmd, **kw)
        job = json.loads(cmd[-1])
        if job["flags"] == ["cfg_parallel"]:
            raise subprocess.TimeoutExpired(cmd, 1800, stderr=b"hung\n")
        if job["flags"] != ["ulysses"]:
            Path(job["result"]).write_text(json.dumps({"step_s": 2.0, "dit_s": 1.5, "other_s": 0.5,
                                                       "gather_s": 0.25, "processes": 2}))
        rc = -6 if "ulysses" in job["flags"] else 0
        return subprocess.CompletedProcess(cmd, rc, "", f"W warn\n{abort}\n" if rc else "")
    monkeypatch.setattr(parallel.subprocess, "run", launch)
    out = tmp_path / "out"
    rc = cli.main(["parallel", "--steps", "1", "--out", str(out), "--work", str(work), "--idle_wait", "0", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    files = {f.suffix: f for f in out.iterdir()}
    assert rc == 1 and err[-1] == f"flf2v-bench: error: CFG-parallel 2, Ulysses 2 failed; see {files['.md']}", err
    rows = {r.pop("layout"): r for r in json.loads(files[".json"].read_text())["measured"]}
    assert rows["CFG-parallel 2"] == {"failed": "exit timeout (1800 s)", "stderr": "hung\n"}, rows
    assert rows["Ulysses 2"] == {"failed": f"exit -6: {abort}", "stderr": f"W warn\n{abort}\n"}, rows
    fsdp = rows["Ulysses 2, DiT FSDP"]
    assert fsdp["step_s"] == 2.0 and fsdp["teardown"] == f"exit -6: {abort}", fsdp
    assert rows["1 process"]["step_s"] == 2.0 and "teardown" not in rows["1 process"], rows
    md = files[".md"].read_text()
    assert f"| Ulysses 2 | failed (exit -6: {abort}; its stderr is in the JSON) |" in md, md
    assert "| Ulysses 2, DiT FSDP | 2 | 2000.0 ms | 1500.0 ms | 500.00 ms | 250.00 ms | 25.0 % |" in md, md
    assert f"Ulysses 2, DiT FSDP: measured, then a process ended with exit -6: {abort} (stderr in the JSON)." in md


def test_the_json_report_is_standard_json(tmp_path):
    """The cache mode's identical videos wrote `"psnr_db": Infinity`, which strict JSON parsers reject."""
    from flf2v.bench.report import Report, machine_info, write

    def strict(text):
        raise ValueError(f"not JSON: {text}")
    paths = write(Report("t", {"psnr_db": float("inf"), "runs": [{"x": float("nan"), "y": 1.5}, (float("-inf"),)]},
                         ["PSNR inf dB"]), "cache", "tiny", machine_info(), None, tmp_path)
    res = json.loads(paths["json"].read_text(), parse_constant=strict)
    assert res["psnr_db"] is None and res["runs"] == [{"x": None, "y": 1.5}, [None]], res
    assert "PSNR inf dB" in paths["md"].read_text()


@pytest.mark.parametrize("backends", ["", ","])
def test_no_backend_named_is_refused(capsys, monkeypatch, backends):
    """An empty --backends ran the whole default set (minutes of engine builds)."""
    from flf2v.bench import cli
    monkeypatch.setattr(cli, "Session", lambda *a: pytest.fail("work began"))
    with pytest.raises(SystemExit) as e:
        cli.main(["--preset", "tiny", "--backends", backends])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("flf2v-bench: error: argument --backends: name at least one "
                                                    "backend (choose from torch, torch-triton, "), err


@pytest.mark.parametrize("interleave", [False, True])
def test_the_idle_wait_comes_after_the_builds_right_before_timing(interleave):
    """The wait for an idle machine preceded the engine builds (minutes of our own load) before."""
    from flf2v.bench.compare import measure
    order = []

    class Runner:
        build_seconds = folder = None

        def __init__(self, name):
            self.name = name

        def load(self):
            order.append(f"build {self.name}")

        def run(self, steps=None):
            order.append(f"{'warm' if steps else 'time'} {self.name}")
            return type("Run", (), {"seconds": 1.0})()

        def close(self):
            pass

    measure({"a": Runner("a"), "b": Runner("b")}, 1, 1, interleave, lambda: order.append("settle"))
    first_timed = next(i for i, e in enumerate(order) if e.startswith("time"))
    assert order[first_timed - 1] == "settle" and order.index("settle") > order.index("build b" if interleave
                                                                                      else "build a"), order


def test_busy_warning_is_in_the_chart_too(tmp_path):
    """The PNG travels without the Markdown: a busy machine changes the chart (it carries the warning)."""
    from flf2v.bench.report import chart
    stage = {"median": 1.0, "min": 0.9, "max": 1.1}
    result = {"preset": "tiny", "backends": {"torch": {"status": "ok", "stages": {"end_to_end": stage}}},
              "job": {"width": 64, "height": 64, "frames": 9, "steps": 2, "dtype": "fp32"},
              "machine": {"gpu": None, "cpu": {"model": "cpu", "cpus": 2}, "date": "2026-12-04"},
              "load": {"busy_before": False, "before": [0.1, 0.1, 0.1], "cpus": 2}}
    chart(result, tmp_path / "idle.png")
    result["load"] = {"busy_before": True, "before": [5.0, 5.0, 5.0], "cpus": 2}
    chart(result, tmp_path / "busy.png")
    assert (tmp_path / "idle.png").read_bytes() != (tmp_path / "busy.png").read_bytes()


def test_export_memory_stopped_while_waiting_for_an_idle_machine_leaves_no_scratch_folder(tmp_path, monkeypatch):
    from flf2v.bench import cli

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli.Session, "settle", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["export-memory", "--work", str(tmp_path), "--layers", "1", "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == [], f"left in --work: {sorted(p.name for p in tmp_path.iterdir())}"


def test_export_memory_on_a_small_disk_says_numbers_that_differ(tmp_path, monkeypatch, capsys):
    """33.2 GB free against 33 GB (+5%) needed read "33 GB free ..., 33 GB needed"."""
    import re
    import shutil
    from types import SimpleNamespace

    from flf2v.bench import cli
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=int(33.2e9)))
    assert cli.main(["export-memory", "--work", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    free, need = (float(v) for v in re.findall(r"([\d.]+) GB", err))
    assert free < need and len(err.splitlines()) == 1, err


def test_export_memory_subcommand_is_wired(capsys):
    from flf2v.bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export-memory", "--help"])
    assert e.value.code == 0
    assert "--work" in capsys.readouterr().out


# ---- fairness: both sides instrumented alike, the same stage boundaries ----------------------------------

def _spans(runner, job, steps):
    import dataclasses
    runner.job = dataclasses.replace(job, steps=steps)
    runner.run()
    return list(runner.probe.log)


def test_ours_and_peer_are_instrumented_alike(tiny_ckpt):
    """Probes are per stage on both sides (their number does not grow with the steps), and the denoise stage
    of both runs from the end of the VAE encode to the start of the VAE decode."""
    from flf2v.bench.runners import DiffusersRunner, Job, OursRunner

    p = get_preset("tiny")
    job = Job(tiny_ckpt, p, 64, 64, 5, 1, p.sample_shift, p.sample_guide_scale)
    cpu = torch.device("cpu")
    for runner in (OursRunner("torch", job, cpu, torch.float32, None), DiffusersRunner(job, cpu, torch.float32)):
        runner.load()
        try:
            one, three = _spans(runner, job, 1), _spans(runner, job, 3)
        finally:
            runner.close()
        names = [n for n, _, _ in three]
        assert [n for n, _, _ in one] == names, (runner.name, names)
        assert names.count("denoise") == 1 and {"vae_encode", "vae_decode"} <= set(names), (runner.name, names)
        i = names.index("denoise")
        (n0, _, enc_end), (_, start, end), (n2, dec_start, _) = three[i - 1:i + 2]
        assert (n0, n2) == ("vae_encode", "vae_decode"), (runner.name, names)
        # gaps measured 0.04-0.3 ms alone; 12 ms once in the full suite (two workers on 2 vCPUs)
        assert 0 <= start - enc_end < 0.05 and 0 <= dec_start - end < 0.05, (runner.name, start - enc_end,
                                                                             dec_start - end)


def test_compare_videos_uses_the_reference():
    from flf2v.bench.compare import compare_videos
    from flf2v.bench.runners import RunResult

    def res(v):
        return RunResult(1.0, {}, {}, {}, None, torch.full((3, 2, 4, 4), v))

    runs = {"torch": ([res(0.0), res(0.0)], []), "ort": ([res(0.25), res(0.5)], []), "diffusers": ([res(-0.125)], [])}
    got = compare_videos(runs)
    assert got["torch"] == {"video_reference": "torch", "video_max_abs_diff": None,
                            "video_run_to_run_max_abs_diff": 0.0}
    assert got["ort"] == {"video_reference": "torch", "video_max_abs_diff": 0.5, "video_run_to_run_max_abs_diff": 0.25}
    assert got["diffusers"]["video_max_abs_diff"] == 0.125 and got["diffusers"]["video_run_to_run_max_abs_diff"] is None
    assert compare_videos({"ort": ([res(0.5)], [])})["ort"]["video_max_abs_diff"] is None  # no reference run


def test_busy_machine_waits_then_reports(monkeypatch, caplog):
    from flf2v.bench import measure

    seen = iter([[5.0, 4, 3], [4.5, 4, 3], [1.5, 3, 3], [9.0, 9, 9]])
    clock = [0.0]
    monkeypatch.setattr(measure.os, "getloadavg", lambda: next(seen))
    monkeypatch.setattr(measure.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    monkeypatch.setattr(measure.time, "monotonic", lambda: clock[0])
    with caplog.at_level("WARNING", logger="flf2v.bench"):
        load = measure.wait_for_idle(cpus=2, max_wait=60, poll=5)
    assert load["first_seen"][0] == 5.0 and load["before"][0] == 1.5 and not load["busy_before"]
    assert load["waited_seconds"] == 10.0 and "busy" in caplog.text
    # never idle: bounded wait, then timed anyway and flagged
    monkeypatch.setattr(measure.os, "getloadavg", lambda: [3.0, 3, 3])
    clock[0] = 0.0
    load = measure.wait_for_idle(cpus=2, max_wait=12, poll=5)
    assert load["busy_before"] and load["waited_seconds"] == 12.0
    from flf2v.bench.report import load_lines
    text = "\n".join(load_lines({"load": {**load, "after": [2.0, 2, 2]}}))
    assert "3.00 before the timing" in text and "2.00 after" in text and "Warning: the machine was busy" in text


# ---- the step-cache bench's video metrics (bench/cache.py) -------------------------------------------

def test_psnr_of_a_known_offset():
    from flf2v.bench.cache import psnr
    a = torch.rand(3, 2, 16, 16) * 1.6 - 0.8
    # +0.2 in [-1, 1] is +0.1 in [0, 1]: MSE 0.01, PSNR 20 dB
    assert abs(psnr(a + 0.2, a) - 20.0) < 1e-4 and psnr(a, a) == float("inf")


def test_ssim_equals_a_per_window_computation():
    """SSIM (Wang et al. 2004, 11x11 Gaussian sigma 1.5) written out window by window in float64."""
    import numpy as np

    from flf2v.bench.cache import ssim
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 2, 14, 13, generator=gen) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    x, y = (a.double().numpy() + 1) / 2, (b.double().numpy() + 1) / 2
    vals = []
    for c in range(3):
        for f in range(2):
            for i in range(14 - 10):
                for j in range(13 - 10):
                    p, q = x[c, f, i:i + 11, j:j + 11], y[c, f, i:i + 11, j:j + 11]
                    mp, mq = (w * p).sum(), (w * q).sum()
                    vp, vq = (w * (p - mp) ** 2).sum(), (w * (q - mq) ** 2).sum()
                    cov = (w * (p - mp) * (q - mq)).sum()
                    vals.append((2 * mp * mq + 1e-4) * (2 * cov + 9e-4) / ((mp**2 + mq**2 + 1e-4) * (vp + vq + 9e-4)))
    want = float(np.mean(vals))
    assert abs(ssim(a, b) - want) < 1e-5, (ssim(a, b), want)
    assert 0.2 < want < 0.95  # a real difference: the comparison means something


def test_load_layouts_loads_the_same_weights_from_every_layout(tmp_path, monkeypatch):
    """`flf2v-bench load-layouts` on the tiny DiT: every layout's load gives the bf16 weights of the values
    written (fp8: of their e4m3fn rounding), each in its own process with its RSS measured. One block of the
    preset's two: the cut DiT matches no preset, so every layout must load under the preset it is given.
    A relative --work: its links' targets were resolved against the links' folder (dangling, exit 1)."""
    from flf2v.bench.cli import main
    from flf2v.bench.export_memory import dit_shapes, lazy_source
    from flf2v.bench.load_layouts import cut_preset

    monkeypatch.chdir(tmp_path)
    assert main(["load-layouts", "--model", "tiny", "--layers", "1", "--out", str(tmp_path), "--work", "w",
                 "--idle_wait", "0", "-q"]) == 0
    (res,) = [json.loads(p.read_text()) for p in tmp_path.glob("load-layouts-*.json")]
    got = res["layouts"]
    assert list(got) == ["official", "diffusers", "comfyui-bf16", "comfyui-fp8"]
    shapes = dit_shapes(cut_preset("tiny", 1).dit)
    written = [g() for g in lazy_source(shapes).values()]
    want = {"bf16": sum(t.to(torch.bfloat16).sum(dtype=torch.float64).item() for t in written),
            "fp8": sum(t.to(torch.float8_e4m3fn).to(torch.bfloat16).sum(dtype=torch.float64).item() for t in written)}
    for name, r in got.items():
        w = want["fp8" if name == "comfyui-fp8" else "bf16"]
        assert abs(r["checksum"] - w) <= 1e-9 * max(1.0, abs(w)), f"{name}: checksum {r['checksum']!r}, want {w!r}"
        assert r["weight_bytes"] == 2 * sum(math.prod(s) for s in shapes.values()), name
        assert r["seconds"] > 0 and r["rss_peak"] >= r["rss_start"] > 0 and r["file_bytes"] > 0, r
    assert [r["same_weights_as_official"] for r in got.values()] == [True, True, True, False]


def test_quant_mode_floors_split_and_layer_errors():
    """`flf2v-bench quant`'s pure parts: the FLOP split (attention exactly what torch's counter gives the SDPA
    calls, the parts adding up to the DiT forward), the mixed-precision floors against the issue's 662 / 570 /
    330 s, the latent grid, and the per-layer / per-scale errors of FP8 linears on the tiny DiT."""
    import copy

    from flf2v.bench import quant as q
    from flf2v.models.dit import WanDiT
    from flf2v.models.make_tiny import randomize_
    from flf2v.models.quant import BLOCK_LINEARS, block_linear_names, capture_inputs, layer_errors, quantize_dit

    for cfg, latent in ((FULL.dit, LATENT_720P), (get_preset("small").dit, (3, 8, 12))):
        s = cost.dit_flops_split(cfg, latent)
        assert close(s["linear"] + s["attention"] + s["other"], cost.dit_forward_flops(cfg, latent), 1e-9)
    d, latent = get_preset("tiny").dit, (3, 8, 12)
    with torch.device("meta"):
        meta = WanDiT(d)
    with FlopCounterMode(display=False) as counter:
        meta.to("meta")(*(t.to("meta") for t in q.dit_inputs(d, latent)))
    by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    attn = sum(v for k, v in by_op.items() if "bmm" in k or "attention" in k)  # meta SDPA: the math path's bmm
    s = cost.dit_flops_split(d, latent)
    assert close(s["attention"], attn, 1e-9), (s["attention"], by_op)
    assert close(s["linear"] + s["other"], sum(by_op.values()) - attn, 1e-9)

    fl = q.floors()
    h100 = {k: v["H100"] for k, v in fl["floor_s"].items()}
    assert h100["bf16"] == pytest.approx(cost.dit_cost(FULL.dit, LATENT_720P, 100).floor(cost.GPUS["H100"]), rel=1e-12)
    assert close(h100["fp8 linears"], 570, 0.005) and close(h100["both"], 330, 0.005), h100  # the issue's figures
    assert h100["both"] < h100["8-bit attention"] < h100["fp8 linears"] < h100["bf16"]
    assert 0.27 < fl["share"]["linear"] < 0.28 and 0.71 < fl["share"]["self_attention"] < 0.72, fl["share"]
    assert [cost.dit_tokens(d, q.latent_for(n)) for n in (256, 192, 30, 7)] == [256, 192, 30, 7]

    torch.manual_seed(0)
    ref = randomize_(WanDiT(d), torch.Generator().manual_seed(0)).eval()
    fp8 = quantize_dit(copy.deepcopy(ref))
    args = q.dit_inputs(d, latent)
    with torch.no_grad():
        inputs = capture_inputs(ref, lambda: ref(*args), block_linear_names(ref))
        table = q.by_kind(layer_errors(ref, fp8, inputs))
        scales = q.scale_errors(ref, inputs)
    assert list(table) == list(BLOCK_LINEARS)
    for kind, e in table.items():  # e4m3's 3 mantissa bits: a few percent, never zero, never ~1
        assert 0.01 < e["mean"] <= e["max"] < 0.08, (kind, e)
    for kind in BLOCK_LINEARS:  # FP8Linear and the simulated per-channel layer agree
        assert abs(scales["output per-channel"][kind] - table[kind]["mean"]) < 0.1 * table[kind]["mean"], kind
        assert 0.015 < scales["weight per-channel"][kind] < 0.04 and 0.015 < scales["weight blockwise"][kind] < 0.04
    w = torch.randn(200, 72)  # out % 128 != 0: partial blocks at both edges
    assert q.rel(q.dequantize_weight(*q.quantize_weight(w, 128), 128), w) < 0.04


def test_quant_checkpoint_mode_gates_the_checkpoints_first_blocks(tiny_ckpt, tmp_path, capsys):
    """`flf2v-bench quant --ckpt_dir`: the output errors it reports are those of the whole DiT cut after loading
    to its first block (fp32, bf16 and FP8 loads), the gate passes on random weights, and bad flags get one line
    and exit 2 before any weight is read."""
    from flf2v.bench import quant as q
    from flf2v.bench.cli import main
    from flf2v.models import checkpoint as ck
    from flf2v.models.lora import load_dit

    common = ["--out", str(tmp_path), "--idle_wait", "0", "-q"]
    assert main(["quant", "--ckpt_dir", str(tiny_ckpt), "--layers", "1", "--tokens", "64", *common]) == 0
    res = json.loads(next(tmp_path.glob("quant-checkpoint-tiny-*.json")).read_text())
    assert (res["layers"], res["of_blocks"], res["dit"]["tokens"]) == (1, 2, 64)
    nets = {"fp32": ck.load_dit(tiny_ckpt), "bf16": ck.load_dit(tiny_ckpt, torch.bfloat16),
            "fp8": load_dit(tiny_ckpt, torch.bfloat16, quant="fp8")}
    args = q.dit_inputs(nets["fp32"].cfg, q.latent_for(64))
    with torch.no_grad():
        out = {}
        for name, net in nets.items():
            net.blocks = net.blocks[:1]
            out[name] = net(*args).float()
    want, gate = {}, res["dit"]["gate"]
    for a, b in (("bf16", "fp32"), ("fp8", "bf16")):
        x, y = out[a].double().flatten(), out[b].double().flatten()
        want[f"{a} vs {b}"] = ((x - y).norm() / y.norm()).item(), 1 - (x @ y / (x.norm() * y.norm())).item()
        got = res["dit"]["output"][f"{a} vs {b}"]["rel"]
        assert close(got, want[f"{a} vs {b}"][0], 1e-5), f"{a} vs {b}: reported rel {got!r}, cut whole DiT {want!r}"
    # the gate's lines are those two pairs, against the README's bounds (16x the error, 256x 1 - cosine)
    for line, i, bound in (("DiT output, rel", 0, 16), ("DiT output, 1 - cosine", 1, 256)):
        g, fp8, base = gate[line], want["fp8 vs bf16"][i], want["bf16 vs fp32"][i]
        assert close(g["fp8_vs_bf16"], fp8, 1e-3) and close(g["bf16_vs_fp32"], base, 1e-3), (line, g, fp8, base)
        assert g["bound"] == bound and g["pass"] == (fp8 <= bound * base), (line, g)
    assert len(gate) == 3 and all(v["pass"] for v in gate.values()), gate
    assert 4 < gate["DiT output, rel"]["ratio"] < 16, gate  # fp8 is coarser than bf16, within the format ratio
    for bad, says in ((["--layers", "3"], "has 2 blocks; give 1 to 2"), (["--tokens", "0"], "--tokens 0")):
        capsys.readouterr()
        assert main(["quant", "--ckpt_dir", str(tiny_ckpt), *bad, *common]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert main(["quant", "--ckpt_dir", str(tmp_path / "none"), *common]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_memory_mode_plans_and_measured_runs(tmp_path):
    """flf2v-bench memory on tiny: every plan's video equals the resident one, the streamed DiT holds fewer bytes
    on the compute device in the loop, and the 4090 time model adds what the copies do not hide."""
    from flf2v.bench.cli import main
    from flf2v.models.sizes import dit_block_bytes
    assert main(["memory", "--preset", "tiny", "--steps", "1", "--idle_wait", "0", "--out", str(tmp_path)]) == 0
    r = json.loads(next(tmp_path.glob("memory-tiny-*.json")).read_text())
    runs = {m["plan"]: m for m in r["measured"]}
    assert all(m["max_abs_vs_resident"] == 0 for m in runs.values()), runs
    full, streamed = runs["resident (no plan)"], runs["offload + t5_cpu + blocks:0"]
    assert streamed["device_bytes"]["denoise"] < full["device_bytes"]["denoise"], runs
    assert streamed["device_bytes"]["text_encoder"] < full["device_bytes"]["text_encoder"], runs  # T5 on the CPU
    fp8 = next(t for t in r["rtx4090_720p"] if t["quant"] == "fp8")
    assert math.isclose(fp8["block_copy_s"], dit_block_bytes(FULL.dit, 2, "fp8") / 25e9, abs_tol=5e-5), fp8  # rounded to 4 places
    chosen = {(p["quant"], p["size"], p["card_gib"]): p.get("name") for p in r["plans_14b"]}
    assert chosen[("none", "1280x720", 80)] == "resident" and "blocks:" in chosen[("none", "1280x720", 24)], chosen
    decode = [t["gib"] for t in r["vae_tiles"]["decode_720p"]]  # whole frames, then tiles largest first
    assert decode == sorted(decode, reverse=True) and decode[-1] < decode[0] / 5, decode
    assert all(20 < t["psnr_db"] < 80 and t["max_abs"] > 0 for t in r["vae_tiles"]["seams"]), r["vae_tiles"]


def test_a_file_as_the_default_work_folder_names_xdg_cache_home(tmp_path, capsys, monkeypatch):
    """--work's default lies under $XDG_CACHE_HOME: a file there was said as "--work ...", a flag never given."""
    from flf2v.bench import cli
    (tmp_path / "f").write_text("x")
    work = tmp_path / "f" / "flf2v" / "bench"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "f"))
    monkeypatch.setattr(cli, "DEFAULT_WORK", work)
    monkeypatch.setitem(cli.WORK, "", str(work))
    assert cli.main(["--preset", "tiny", "--cost_only", "--idle_wait", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--work (its default, under $XDG_CACHE_HOME)" in err[0], err
