"""One video over several processes (runtime/parallel.py, models/parallel.py, models/sharded.py) on this CPU:
torchrun with 2 and 4 gloo processes on the tiny-4h checkpoint (4 attention heads, so Ulysses 4 divides
them), each layout's video against the single-process video made in the same processes; the flf2v-run
CLI under torchrun; a killed process; flag checks; the Ulysses attention op on a subset of heads; the
communication cost model's figures from first principles."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import once, rel_err

from flf2v.models.config import get_preset
from flf2v.runtime.media import InputError
from flf2v.runtime.parallel import check_layout

WORKER = Path(__file__).with_name("dist_worker.py")
TOL = 1e-4  # the fp32 parity tolerance (CFG-parallel's batch-1 calls round unlike one batch-2 call)


@pytest.fixture(scope="module")
def ckpt4(tmp_path_factory):
    from flf2v.models.make_tiny import write_tiny_checkpoint
    return once(tmp_path_factory, "ckpt-4h", lambda p: write_tiny_checkpoint(p, "tiny-4h", seed=0))


@pytest.fixture(scope="module")
def calibration4(ckpt4, demo_frames, tmp_path_factory):
    from flf2v.runtime import calibrate_cache as K
    from flf2v.runtime.media import load_image
    frames = [load_image(p) for p in demo_frames]
    return K.run(ckpt4, *frames, "a ball", out=tmp_path_factory.mktemp("cal4") / "cal.json", progress=False,
                 size="64*64", frame_num=9, seed=0)


def torchrun(n: int, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(WORKER),
           *map(str, args)]
    # its own process group, so a timeout takes torchrun's workers down with it
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run_cases(n, ckpt, frames, tmp_path, cases, calibration=None):
    out = tmp_path / f"cases-{n}.json"
    r = torchrun(n, "cases", "--ckpt", ckpt, "--frames", frames[0].parent, "--out", out,
                 *(["--calibration", calibration] if calibration else []), *cases)
    assert r.returncode == 0, f"torchrun {n} failed:\n{r.stdout[-2000:]}\n{r.stderr[-5000:]}"
    res = json.loads(out.read_text())
    assert sorted(res) == sorted(cases), res
    for case, e in res.items():
        print(f"{n} processes, {case}: max abs {e['max_abs']:.2e}, rel {e['max_rel']:.2e}"
              + (f"; vs one process with batch-1 calls: max abs {e['max_abs_vs_batch1']:.2e}"
                 if "max_abs_vs_batch1" in e else ""))
        assert e["max_rel"] < TOL, f"{case} on {n} processes vs one: max abs {e['max_abs']:.2e}, rel {e['max_rel']:.2e}"
    return res


def test_two_processes(ckpt4, demo_frames, calibration4, tmp_path):
    """Ulysses 2, CFG-parallel 2 (with the step cache's two programs too), each with and without sharded
    weights; one DiT forward of 27 tokens (padded to 28: the videos' 48 tokens need no padding) under Ulysses
    with SDPA and with the fused Triton attention."""
    res = run_cases(2, ckpt4, demo_frames, tmp_path,
                    ["u2", "u2+dit_fsdp+t5_fsdp", "cfg", "cfg+dit_fsdp", "cfg+cache", "cfg+cache+dit_fsdp", "dit-sdpa-u2",
                     "dit-triton-u2"],
                    calibration4)
    assert res["u2"]["shape"] == [3, 9, 64, 64]
    assert "c" in res["cfg+cache"]["cache"]["schedule"], res["cfg+cache"]  # a cached step ran


def test_four_processes(ckpt4, demo_frames, tmp_path):
    """Ulysses 4 and CFG-parallel x Ulysses 2, with and without sharded weights; 27 DiT tokens over 4 (padded
    to 28)."""
    run_cases(4, ckpt4, demo_frames, tmp_path, ["u4", "u4+dit_fsdp", "cfg-u2", "cfg-u2+dit_fsdp+t5_fsdp", "dit-sdpa-u4"])


def test_cfg_parallel_on_engines(tiny_ckpt, tiny_engines, demo_frames, tmp_path):
    """CFG-parallel with ONNX Runtime engines: each process its batch-1 DiT engine."""
    out = tmp_path / "cases-2.json"
    r = torchrun(2, "cases", "--ckpt", tiny_ckpt, "--frames", demo_frames[0].parent, "--out", out, "--engines",
                 tiny_engines, "cfg+ort")
    assert r.returncode == 0, f"torchrun 2 failed:\n{r.stderr[-5000:]}"
    assert "FutureWarning" not in r.stderr, r.stderr  # the CFG all-gather's deprecation, once per step
    e = json.loads(out.read_text())["cfg+ort"]
    print(f"CFG-parallel ORT vs one torch process: max abs {e['max_abs']:.2e}, rel {e['max_rel']:.2e}")
    assert e["max_rel"] < TOL, e


def _cli(ckpt, frames, out: Path, *extra):
    return ["--", *map(str, ["--task", "flf2v-14B", "--ckpt_dir", ckpt, "--first_frame", frames[0], "--last_frame",
                             frames[1], "--prompt", "a ball", "--size", "64*64", "--frame_num", "9",
                             "--sample_steps", "3", "--base_seed", "3", "--backend", "torch", "--save_file", out,
                             "--quiet", *extra])]


def test_cli_under_torchrun_writes_one_video(ckpt4, demo_frames, tmp_path):
    """With a random seed (--base_seed -1: each process draws one), both ranks run rank 0's."""
    out, metrics, seeds = tmp_path / "v.mp4", tmp_path / "m.json", tmp_path.parent / f"{tmp_path.name}-seed"
    r = torchrun(2, "cli", "--record", seeds, *_cli(ckpt4, demo_frames, out, "--ulysses_size", "2", "--dit_fsdp",
                                                    "--metrics", metrics, "--base_seed", "-1"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "v.mp4"]
    ran = [int(Path(f"{seeds}.{rank}").read_text()) for rank in (0, 1)]
    assert ran[0] == ran[1] == json.loads(metrics.read_text())["run"]["seed"], ran
    alive = [int(Path(f"{seeds}.threads.{rank}").read_text()) for rank in (0, 1)]
    assert alive == [0, 0], f"gloo threads alive after flf2v-run's main returned, per rank: {alive}"
    assert r.stdout.count("wrote ") == 1 and r.stdout.count("flf2v-run: backend torch") == 1, r.stdout
    assert "flf2v-run: rank 1: peak memory: host_peak_rss_gib" in r.stdout, r.stdout
    m = json.loads(metrics.read_text())
    assert m["parallel"] == {"processes": 2, "layout": "Ulysses 2, DiT weights sharded (FSDP2)"}, m["parallel"]


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_failed_process_stops_the_run_without_a_video(ckpt4, demo_frames, tmp_path, how):
    """Rank 1 SIGKILLed (rank 0's collective fails at once: connection reset), or hung (rank 0's collective
    times out after --dist_timeout 10 s): rank 0 says so in one line, torchrun stops rank 1, no mp4."""
    out = tmp_path / "v.mp4"
    t0 = time.monotonic()
    r = torchrun(2, "cli", f"--{how}", "1:1", *_cli(ckpt4, demo_frames, out, "--cfg_parallel", "--dist_timeout", "10"),
                 timeout=300)
    took = time.monotonic() - t0
    assert r.returncode != 0 and took < 180, (r.returncode, took)  # ~25 s alone; the other worker may compile
    assert not out.exists() and list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    ours = [line for line in r.stderr.splitlines() if line.startswith("flf2v-run: rank 0: error:")]
    assert len(ours) == 1 and "no video was written" in ours[0], r.stderr[-3000:]


def test_ranks_given_other_flags_refuse_in_one_line(ckpt4, demo_frames, tmp_path):
    """Rank 1 given another --frame_num would run collectives of another shape (gloo aborts, NCCL hangs)."""
    out = tmp_path / "v.mp4"
    r = torchrun(2, "cli", "--rank_args", "1:--frame_num 5", *_cli(ckpt4, demo_frames, out, "--ulysses_size", "2"))
    ours = [line for line in r.stderr.splitlines() if line.startswith("flf2v-run:")]
    assert r.returncode != 0 and ours == [
        "flf2v-run: rank 0: error: the processes of this torchrun job disagree on frame_num (rank 0: 9, rank 1: 5); "
        "give every process the same flags and files"], r.stderr[-3000:]
    assert not out.exists()


@pytest.mark.parametrize("frame,says", [("none.png", "none.png"), ("thin.png", "the first frame: ")])
def test_a_file_error_of_one_rank_is_said_by_that_rank(tiny_ckpt, demo_frames, tmp_path, monkeypatch, capsys, frame,
                                                       says):
    """A frame missing on one node, or readable there but too elongated for the model's sizing: that rank says so
    (the others have no error to say)."""
    from PIL import Image

    from flf2v.runtime import cli
    Image.new("RGB", (2000, 8)).save(tmp_path / "thin.png")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    args = _cli(tiny_ckpt, demo_frames, tmp_path / "v.mp4", "--ulysses_size", "2", "--first_frame",
                tmp_path / frame)[1:]
    assert cli.main(args) == 2 and not torch.distributed.is_initialized()
    err = capsys.readouterr().err
    assert err.startswith("flf2v-run: rank 1: error: ") and says in err and err.count("\n") == 1, err


# ---- in one process -------------------------------------------------------------------------------------

def test_layout_errors_name_the_launch():
    for world, u, cfg, want in ((3, 2, False, "--ulysses_size 2 needs 2 processes, but this run has 3"),
                                (2, 2, True, "--ulysses_size 2 x 2 (--cfg_parallel) needs 4 processes"),
                                (1, 2, False, "torchrun --nproc_per_node 2")):
        with pytest.raises(InputError, match=want.replace("(", r"\(").replace(")", r"\)")):
            check_layout(world, u, cfg)
    with pytest.raises(InputError, match="ring attention is not implemented"):
        check_layout(2, 2, False, ring_size=2)
    check_layout(4, 2, True)


@pytest.mark.parametrize("rank,world,flags,want", [
    ("0", "3", ["--ulysses_size", "2"], "--ulysses_size 2 needs 2 processes"),
    ("1", "3", ["--ulysses_size", "2"], None),
    ("0", "4", ["--ulysses_size", "4"], "--ulysses_size 4 must divide tiny's 2 attention heads"),
    ("0", "2", ["--cfg_parallel", "--sample_guide_scale", "1"], "--cfg_parallel splits the cond and uncond"),
])
def test_cli_flag_errors_are_said_once(tiny_ckpt, demo_frames, tmp_path, monkeypatch, capsys, rank, world, flags,
                                       want):
    """Refused before any process group exists (nothing to wait for), by rank 0 alone."""
    from flf2v.runtime import cli
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", rank)
    out = tmp_path / "v.mp4"
    code = cli.main(_cli(tiny_ckpt, demo_frames, out, *flags)[1:])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and not torch.distributed.is_initialized()
    if want:
        assert err.startswith(f"flf2v-run: rank 0: error: {want}") and err.count("\n") == 1, err
    else:
        assert err == ""


def test_heads_op_equals_the_full_attention_on_those_heads():
    """Ulysses' kernel call: H/U of the heads, normed with the RMS over all H, equals those heads' columns of
    the full-width fused attention's reference."""
    import flf2v.kernels.ops  # noqa: F401
    from flf2v.kernels.attention import wan_self_attention_ref
    g = torch.Generator().manual_seed(0)
    b, s, h, d, eps = 2, 21, 4, 16, 1e-6
    q, k, v = (torch.randn(b, s, h * d, generator=g) for _ in range(3))
    wq, wk = torch.rand(h * d, generator=g) + 0.5, torch.rand(h * d, generator=g) + 0.5
    ang = torch.rand(s, d // 2, generator=g) * 6
    cos, sin = ang.cos(), ang.sin()
    want = wan_self_attention_ref(q, k, v, wq, wk, cos, sin, eps, h)
    rq, rk = (torch.rsqrt(t.pow(2).mean(-1) + eps) for t in (q, k))
    for part in range(2):  # heads 0-1, then 2-3
        c = slice(part * 2 * d, (part + 1) * 2 * d)
        got = torch.ops.flf2v.wan_self_attention_heads(q[..., c].contiguous(), k[..., c].contiguous(),
                                                       v[..., c].contiguous(), wq[c].contiguous(),
                                                       wk[c].contiguous(), cos, sin, rq, rk, 2)
        err, rel = rel_err(got, want[..., c])
        assert rel < 1e-5, f"heads {2 * part}-{2 * part + 1}: max abs {err:.2e}, rel {rel:.2e}"


def test_cost_model_from_first_principles():
    """720p / 81 frames: 21 x 45 x 80 = 75,600 tokens, dim 5120, 40 blocks. Ulysses 4, CFG on one process
    pair each (CFG-parallel): per step a rank runs 1 DiT call and sends, per block, 4 tensors of 18,900 x 5120
    bf16 of which 3/4 leave it; then 3 shards of the fp32 blocks' output; and one fp32 velocity."""
    from flf2v.bench.parallel import comm_per_step
    p = get_preset("flf2v-14B")
    c = comm_per_step(p, 1280, 720, 81, 4, True)
    assert c["tokens"] == 75_600 and c["gpus"] == 8
    assert c["bytes_all_to_all"] == 4 * 18_900 * 5120 * 2 * 3 / 4 * 40
    assert c["bytes_all_gather"] == 18_900 * 5120 * 4 * 3
    assert c["bytes_cfg"] == 16 * 21 * 90 * 160 * 4
    two = comm_per_step(p, 1280, 720, 81, 2, False)  # no CFG split: cond and uncond calls on every rank
    assert two["bytes_all_to_all"] == 4 * 37_800 * 5120 * 2 / 2 * 40 * 2


def test_sharded_loading_reads_only_row_slices(tiny_ckpt, tmp_path, monkeypatch):
    """models/sharded.py in a one-process gloo world: every DiT tensor comes through its `rows` reader (a
    safetensors slice), never read whole, and the sharded model's weights equal checkpoint.load's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from flf2v.models import checkpoint as ck
    from flf2v.models.sharded import load_sharded, local_rows
    assert [local_rows(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert local_rows(2, 4, 3) == (2, 2)  # torch.chunk's split: the last ranks may hold nothing
    real = ck.tensor_source

    def rows_only(ckpt_dir, component):
        source, origin, ignore = real(ckpt_dir, component)

        def whole():
            raise AssertionError("a whole tensor was read")
        wrapped = {}
        for k, g in source.items():
            w = lambda: whole()  # noqa: E731
            w.rows = g.rows
            wrapped[k] = w
        return wrapped, origin, ignore
    monkeypatch.setattr(ck, "tensor_source", rows_only)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = load_sharded(tiny_ckpt, "dit", torch.float32, ck.preset_for(tiny_ckpt),
                             init_device_mesh("cpu", (1,)), torch.device("cpu"))
        monkeypatch.setattr(ck, "tensor_source", real)
        want = ck.load_dit(tiny_ckpt)
        for name, p in model.named_parameters():
            assert torch.equal(p.full_tensor(), want.get_parameter(name)), name
    finally:
        dist.destroy_process_group()
