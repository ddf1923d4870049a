"""flf2v-run: a video and metrics from the tiny checkpoint; user mistakes end in one line and exit 2."""
import json
import os
import stat

import pytest
from helpers import _args, run

from flf2v.models.config import get_preset
from flf2v.runtime.cli import main


def test_run_writes_video_and_metrics(tiny_ckpt, demo_frames, tmp_path, capsys):
    out, metrics = tmp_path / "v.mp4", tmp_path / "m.json"
    old = os.umask(0o022)
    try:
        assert main(_args(tiny_ckpt, demo_frames, out, "--metrics", str(metrics), "--fps", "24")) == 0
    finally:
        os.umask(old)
    import av

    from flf2v.runtime.media import read_video
    assert read_video(out).shape == (5, 64, 64, 3)
    with av.open(str(out)) as f:
        assert f.streams.video[0].average_rate == 24
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # like any new file under umask 022 (mkstemp: 0600)
    m = json.loads(metrics.read_text())
    assert m["run"] == {"prompt": "a red ball", "negative_prompt": get_preset("tiny").sample_neg_prompt,
                        "height": 64, "width": 64, "frame_num": 5, "sample_solver": "unipc", "sample_steps": 2,
                        "sample_shift": 16.0, "guide_scale": 5.0, "seed": 3, "cfg_batch": 2}
    assert m["memory"]["host_peak_rss_gib"] > 0 and m["fps"] == 24
    assert {"load", "preprocess", "text_encoder", "denoise", "vae_decode", "save", "other"} <= set(m["seconds"])
    assert abs(sum(m["seconds"].values()) - m["end_to_end_s"]) < 1e-6 and m["seconds"]["other"] >= 0
    assert {"torch", "triton", "onnxruntime", "av"} <= set(m["versions"])
    out_lines = capsys.readouterr().out
    assert "flf2v-run: backend torch" in out_lines and "wrote" in out_lines and "random weights" in out_lines


def test_help_shows_the_defaults_of_the_task(capsys):
    for task, expect in (("flf2v-14B", ["default 50)", "default 16)", "镜头切换"]),
                         ("i2v-14B", ["default 40)", "default 5, 3 at 832*480", "镜头晃动"])):
        with pytest.raises(SystemExit):
            main(["--task", task, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(e in text for e in expect), (task, text)


def test_help_shows_the_checkpoints_defaults(tiny_ckpt, capsys):
    with pytest.raises(SystemExit):
        main(["--ckpt_dir", str(tiny_ckpt), "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 9," in text and "default 4)" in text, text


@pytest.mark.parametrize("extra,match", [
    (["--frame_num", "8"], "4n+1"),
    (["--size", "1920*1080"], "not supported"),
    (["--sample_steps", "0"], "--sample_steps 0"),
    (["--sample_guide_scale", "nan"], "finite"),
    (["--backend", "tpu"], "invalid choice"),
    (["--task", "i2v-14B"], "needs an i2v checkpoint"),
    (["--base_seed", str(2**64)], "out of range"),
    (["--save_file", "x.avi"], "must end in .mp4"),
    (["--device", "tpu:0"], "--device tpu:0"),
    (["--cuda_graph", "maybe"], "expected true/false"),
    (["--fps", "0"], "--fps 0"),
])
def test_bad_flags_exit_2(tiny_ckpt, demo_frames, tmp_path, capsys, extra, match):
    out = tmp_path / "v.mp4"
    args = _args(tiny_ckpt, demo_frames, out)
    for i in range(0, len(extra), 2):  # later flags win in argparse
        args += extra[i:i + 2]
    assert run(args) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob("*.part*"))


def test_output_engines_and_frame_paths_said_for_what_they_are(tiny_ckpt, demo_frames, tmp_path, capsys, monkeypatch):
    """Found by a new user: a folder as --save_file was told to "end in .mp4"; "x.mp4 " (a trailing space) was
    told so too, the space unseen; a file as --engines was "no such folder"; an unreadable frame came out as a
    bare "Permission denied" (the HEIF sniff opened it again), naming no flag and no fix."""
    _no_weights(monkeypatch)
    (tmp_path / "afile").write_text("x")
    for flag, value, says in (("--save_file", str(tmp_path), f"--save_file {tmp_path} is a folder; give a file path"),
                              ("--save_file", "x.mp4 ", "--save_file 'x.mp4 ' must end in .mp4"),
                              ("--engines", str(tmp_path / "afile"), "afile: is a file, not a folder; give a folder")):
        assert run(_args(tiny_ckpt, demo_frames, tmp_path / "v.mp4") + [flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(demo_frames[0]))
    monkeypatch.setattr("PIL.Image.open", denied)  # chmod 000 does not stop root, who runs CI
    assert run(_args(tiny_ckpt, demo_frames, tmp_path / "v.mp4")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"flf2v-run: error: image {demo_frames[0]} cannot be read (Permission denied); check its " \
                  f"permissions", err


def test_a_checkpoint_folder_as_engines_is_said_so(tiny_ckpt, demo_frames, tmp_path, capsys, monkeypatch):
    """The fix was to build engines into the checkpoint's own folder (--out CKPT/dynamic)."""
    _no_weights(monkeypatch)
    assert run(_args(tiny_ckpt, demo_frames, tmp_path / "v.mp4") + ["--engines", str(tiny_ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"flf2v-run: error: --engines {tiny_ckpt} is a checkpoint folder, not an engine folder; give the " \
                  f"folder flf2v-build wrote (its --out), or drop --engines to use engines/<this machine>/", err


def _no_weights(monkeypatch):
    def loads(*a, **k):
        raise AssertionError("a backend started loading weights before the request was checked")
    monkeypatch.setattr("flf2v.runtime.torch_backend.TorchBackend.__init__", loads)
    monkeypatch.setattr("flf2v.runtime.backends.open_backend", loads)


@pytest.mark.parametrize("backend", ["torch", "ort", "aoti", "auto"])
@pytest.mark.parametrize("extra,match", [(["--size", "1920*1080"], "not supported"),
                                         (["--frame_num", "0"], "4n+1"),
                                         (["--cache", "magcache", "--sample_steps", "8"],
                                          "no step-cache calibration"),
                                         (["--engines", "/no/such/folder"], "no such folder")])
def test_request_checked_before_any_weight_loads(tiny_ckpt, demo_frames, tmp_path, capsys, monkeypatch, backend,
                                                 extra, match):
    _no_weights(monkeypatch)
    args = _args(tiny_ckpt, demo_frames, tmp_path / "v.mp4") + ["--backend", backend, *extra]
    assert run(args) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("flag,where,match", [
    ("--save_file", "dir.mp4", "is a folder"),          # an existing directory of that name
    ("--save_file", "file/v.mp4", "is a file, not a folder"),
    ("--metrics", "dir.mp4", "is a folder"),
    ("--metrics", "file/deeper/m.json", "is a file, not a folder"),
    ("--metrics", "v.mp4", "must end in .json"),  # written over the video, or a frame, after the run
    ("--metrics", "ckpt/config.json", "inside the checkpoint folder"),
])
def test_output_paths_checked_before_any_weight_loads(tiny_ckpt, demo_frames, tmp_path, capsys, monkeypatch,
                                                       flag, where, match):
    (tmp_path / "dir.mp4").mkdir()
    (tmp_path / "file").write_text("not a folder")
    _no_weights(monkeypatch)
    target = str(tiny_ckpt / where.removeprefix("ckpt/") if where.startswith("ckpt/") else tmp_path / where)
    args = _args(tiny_ckpt, demo_frames, tmp_path / "v.mp4") + [flag, target]
    assert run(args) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and target in err and len(err.splitlines()) == 1, err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["dir.mp4", "file"]  # nothing left behind


@pytest.mark.parametrize("flag,where,match", [
    ("--save_file", "dl/sub/v.mp4", "is a link to"),  # mkdir said only "File exists", after the run
    ("--metrics", "dl/m.json", "is a link to"),
    ("--save_file", "a" * 300 + ".mp4", "bytes, over the"),
])
def test_output_paths_no_file_system_takes_are_refused_first(tiny_ckpt, demo_frames, tmp_path, capsys, monkeypatch,
                                                             flag, where, match):
    (tmp_path / "dl").symlink_to(tmp_path / "nowhere")
    _no_weights(monkeypatch)
    assert run(_args(tiny_ckpt, demo_frames, tmp_path / "v.mp4") + [flag, str(tmp_path / where)]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and flag in err and len(err.splitlines()) == 1, err


def test_a_missing_prompt_is_one_line(tiny_ckpt, demo_frames, tmp_path, capsys, monkeypatch):
    _no_weights(monkeypatch)
    args = _args(tiny_ckpt, demo_frames, tmp_path / "v.mp4")
    del args[args.index("--prompt"):args.index("--prompt") + 2]
    assert run(args) == 2
    assert capsys.readouterr().err.strip() == 'flf2v-run: error: --prompt is required: describe the video to ' \
                                               'generate (--prompt "...")'


@pytest.mark.parametrize("extra", [["--use_prompt_extend"], ["--use_prompt_extend", "--prompt_extend_method",
                                                              "local_qwen", "--prompt_extend_target_lang", "en"]])
def test_the_official_prompt_extension_is_refused_with_the_fix(tiny_ckpt, demo_frames, tmp_path, capsys, monkeypatch,
                                                               extra):
    """The official README's --use_prompt_extend command: one line naming the fix, not "unrecognized"."""
    _no_weights(monkeypatch)
    assert run(_args(tiny_ckpt, demo_frames, tmp_path / "v.mp4") + extra) == 2
    err = capsys.readouterr().err.strip()
    assert "--use_prompt_extend: flf2v has no prompt extender" in err and "into --prompt" in err, err
    assert " ".join(f for f in extra if f.startswith("--")) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("argv, said", [
    (["--task", "flf2v-1.3B"], "argument --task: invalid choice: 'flf2v-1.3B' (choose from 'flf2v-14B', 'i2v-14B')"),
    (["--prompt", "x", "--ckpt_dir"], "argument --ckpt_dir: expected one argument"),
    (["--task"], "argument --task: expected one argument")])
def test_a_bad_task_or_a_flag_without_its_value_is_one_line(capsys, argv, said):
    """The pre-parser that picks --help's defaults printed its own two-flag usage line above the error."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and capsys.readouterr().err == f"flf2v-run: error: {said}\n"


@pytest.mark.parametrize("flag", ["--size", "--save_file", "--engines", "--metrics", "--last_frame", "--device"])
def test_an_empty_value_is_refused_not_taken_for_the_default(tiny_ckpt, demo_frames, tmp_path, capsys, monkeypatch,
                                                             flag):
    """`--size "$SIZE"` with SIZE unset must not quietly run the default size (or write the default file)."""
    _no_weights(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert run(_args(tiny_ckpt, demo_frames, tmp_path / "v.mp4") + [flag, ""]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{flag} is empty" in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_fractional_fps(tiny_ckpt, demo_frames, tmp_path):
    from fractions import Fraction

    import av
    out = tmp_path / "v.mp4"
    assert main(_args(tiny_ckpt, demo_frames, out, "--fps", "29.97")) == 0
    with av.open(str(out)) as f:
        assert f.streams.video[0].average_rate == Fraction(2997, 100)


def test_ctrl_c_says_one_line_and_exits_130(tiny_ckpt, demo_frames, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("flf2v.runtime.pipeline.Pipeline.generate", interrupted)
    out = tmp_path / "v.mp4"
    assert main(_args(tiny_ckpt, demo_frames, out)) == 130
    err = capsys.readouterr().err.strip()
    assert err == "flf2v-run: error: interrupted; no video was written", err
    assert not out.exists() and not list(tmp_path.glob("*.part*"))


def test_ctrl_c_after_the_video_is_written_says_so(tiny_ckpt, demo_frames, tmp_path, capsys, monkeypatch):
    """Stopped while the metrics are written: the video is there, and the message said there was none."""
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("flf2v.runtime.cli.write_metrics", interrupted)
    out, metrics = tmp_path / "v.mp4", tmp_path / "m.json"
    assert main(_args(tiny_ckpt, demo_frames, out, "--metrics", str(metrics))) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"flf2v-run: error: interrupted; {out} was written; --metrics {metrics} was not written", err
    assert out.exists() and not metrics.exists()


def test_ctrl_c_in_the_exit_after_a_command_is_no_traceback(tmp_path):
    """A Ctrl-C after the command returned lands in the atexit finalizers (torch registers some): it printed
    "Exception ignored in atexit callback" and a traceback. A finalizer sending it stands in for the user."""
    import signal
    import subprocess
    import sys
    script = (
        "import atexit, os, signal, sys, time\n"
        "from flf2v import entry\n"
        "def cmd(argv):\n"
        "    atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2), print('exited')))\n"
        "    return 0\n"
        "sys.exit(entry._command('flf2v-x', '__main__:cmd', []))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "exited", ""), (r.returncode, r.stdout, r.stderr)


def test_a_full_disk_at_the_metrics_names_the_video_written(tiny_ckpt, demo_frames, tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("flf2v.runtime.cli.write_metrics", full)
    out, metrics = tmp_path / "v.mp4", tmp_path / "m.json"
    assert main(_args(tiny_ckpt, demo_frames, out, "--metrics", str(metrics))) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"flf2v-run: error: No space left on device ({metrics}); {out} was written; --metrics {metrics} " \
                  f"was not written", err
    assert out.exists() and not metrics.exists()


def test_a_closed_pipe_under_the_wrote_line_does_not_say_no_video(tiny_ckpt, demo_frames, tmp_path, capsys,
                                                                   monkeypatch):
    """`flf2v-run ... | head -n 2`: the video and metrics are on disk when the "wrote" line meets the closed pipe."""
    import builtins

    from flf2v.runtime import cli

    def closed(*a, **k):
        if a and str(a[0]).startswith("wrote "):
            raise BrokenPipeError(32, "Broken pipe")
        builtins.print(*a, **k)
    monkeypatch.setattr(cli, "print", closed, raising=False)
    out, metrics = tmp_path / "v.mp4", tmp_path / "m.json"
    assert main(_args(tiny_ckpt, demo_frames, out, "--metrics", str(metrics))) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"flf2v-run: error: Broken pipe (output); {out} was written", err
    assert out.exists() and metrics.exists()


@pytest.mark.parametrize("sig,code,says", [
    ("SIGINT", 130, "interrupted; no video was written"),
    # kill, docker stop, a batch scheduler: was killed silently (exit -15), a partial mp4 left if in the save
    ("SIGTERM", 143, "terminated (SIGTERM); no video was written")])
def test_sigint_to_the_real_command_is_one_line_and_exit_130(tiny_ckpt, demo_frames, tmp_path, sig, code, says):
    """Ctrl-C as the user sends it: SIGINT to a `flf2v-run` process in its denoising loop; and SIGTERM."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    out = tmp_path / "v.mp4"
    args = _args(tiny_ckpt, demo_frames, out, "--sample_steps", "5000")  # long enough to be interrupted
    # SIGINT as in a user's terminal: a test run in the background of a shell without job control inherits it
    # ignored (bash), and Python then installs no KeyboardInterrupt handler in the child
    p = subprocess.Popen([str(Path(sys.executable).parent / "flf2v-run"), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while "flf2v-run: backend" not in p.stdout.readline():  # loaded: the loop starts next
            assert p.poll() is None, p.stderr.read()
        time.sleep(2)
        p.send_signal(getattr(signal, sig))
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == code and err.strip() == f"flf2v-run: error: {says}", (p.returncode, err)
    assert not out.exists() and not list(tmp_path.glob("*.part*"))


def test_ctrl_c_dropped_in_a_del_still_stops_the_run(tiny_ckpt, demo_frames, tmp_path, capsys, monkeypatch):
    """The garbage collector runs __del__ anywhere, and Python drops what it raises (a traceback on stderr): a
    Ctrl-C landing there went on to write the video and exit 0."""
    from flf2v import entry
    from flf2v.runtime.pipeline import Pipeline

    class Dropped:
        def __del__(self):
            raise KeyboardInterrupt

    generate = Pipeline.generate
    monkeypatch.setattr(Pipeline, "generate", lambda self, *a, **k: (Dropped(), generate(self, *a, **k))[1])
    out = tmp_path / "v.mp4"
    assert entry.run(_args(tiny_ckpt, demo_frames, out)) == 130
    err = capsys.readouterr().err.strip()
    assert err == "flf2v-run: error: interrupted; no video was written", err
    assert not out.exists() and not list(tmp_path.glob("*.part*"))
    from flf2v import log
    assert not log.ctrl_c_lost(), "the next command in this process would stop as interrupted"


def test_task_is_the_checkpoints(demo_frames, tmp_path, capsys):
    """An I2V checkpoint with --image and no --task runs I2V (and says so), as an FLF2V one runs FLF2V."""
    from flf2v.models.make_tiny import write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "i2v", "tiny-i2v")
    out = tmp_path / "v.mp4"
    args = ["--ckpt_dir", str(ckpt), "--image", str(demo_frames[0]), "--prompt", "a red ball", "--size", "64*64",
            "--frame_num", "5", "--sample_steps", "2", "--save_file", str(out), "--quiet", "--backend", "torch"]
    assert main(args) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert out.exists() and "Wan2.1-I2V-14B-720P" in said, said
    assert main([*args, "--task", "flf2v-14B", "--last_frame", str(demo_frames[1])]) == 2
    assert f"but {ckpt} holds an i2v model; pass the matching --task" in capsys.readouterr().err  # was "a i2v"


def test_step_cache_hint_works_as_printed(demo_frames, tmp_path, capsys):
    """--cache magcache without a calibration names a command; run as printed, it makes the run work."""
    import re
    import shlex

    from flf2v.models.make_tiny import write_tiny_checkpoint
    from flf2v.runtime.calibrate_cache import main as calibrate
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    args = _args(ckpt, demo_frames, tmp_path / "v.mp4", "--cache", "magcache", "--sample_steps", "8")
    assert run(args) == 2
    err = capsys.readouterr().err
    hint = re.search(r"run (flf2v-calibrate-cache .*?) once", err)
    assert hint, err
    words = shlex.split(hint[1])
    assert calibrate(words[1:] + ["--quiet"]) == 0
    assert run(args) == 0, capsys.readouterr().err


def test_warnings_are_one_line(tiny_ckpt, tiny_dynamic_engines, demo_frames, tmp_path):
    """Guide scale 1 on batch-2-only engines warns once, as `flf2v-run: warning: ...`, not Python's
    two-line file:line form."""
    import subprocess
    import sys
    from pathlib import Path
    args = _args(tiny_ckpt, demo_frames, tmp_path / "v.mp4", "--backend", "ort", "--engines",
                 str(tiny_dynamic_engines), "--sample_guide_scale", "1")
    r = subprocess.run([str(Path(sys.executable).parent / "flf2v-run"), *args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(said) == 1 and said[0].startswith("flf2v-run: warning: guide scale 1 runs the DiT"), r.stderr


def test_missing_image(tiny_ckpt, demo_frames, tmp_path, capsys):
    args = _args(tiny_ckpt, (tmp_path / "nope.png", demo_frames[1]), tmp_path / "v.mp4")
    assert main(args) == 2
    assert "nope.png not found" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("extra,match", [
    (["--device", "cuda"], "no CUDA GPU is usable here"),
    (["--backend", "trt", "--device", "cpu"], "--backend trt needs a CUDA GPU"),
])
def test_gpu_flags_without_gpu_exit_2(tiny_ckpt, demo_frames, tmp_path, capsys, extra, match):
    assert run(_args(tiny_ckpt, demo_frames, tmp_path / "v.mp4", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err


def test_trt_backend_without_tensorrt_names_the_install(tiny_ckpt, demo_frames, tmp_path, capsys, monkeypatch):
    """With CUDA but no TensorRT: one line naming the install command, not an ImportError traceback."""
    import sys

    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    assert run(_args(tiny_ckpt, demo_frames, tmp_path / "v.mp4", "--backend", "trt", "--device", "cuda")) == 2
    err = capsys.readouterr().err.strip()
    assert "needs TensorRT" in err and "pip install tensorrt-cu13" in err and len(err.splitlines()) == 1, err


def test_a_vae_decoding_to_nan_writes_no_video(tiny_ckpt, demo_frames, tmp_path, capsys):
    """NaN decoder weights: the latents were finite, the decoded video NaN, clamped into a broken mp4, exit 0."""
    import shutil

    import torch

    from flf2v.models import checkpoint as ck
    bad = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    sd = torch.load(bad / ck.VAE_FILE, weights_only=True)
    torch.save({k: v.fill_(float("nan")) if k.startswith("decoder.") and v.is_floating_point() else v
                for k, v in sd.items()}, bad / ck.VAE_FILE)
    out = tmp_path / "v.mp4"
    assert run(_args(bad, demo_frames, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err == "flf2v-run: error: the VAE decoded the latents to NaN/Inf; check the checkpoint's VAE " \
                  "(Wan2.1_VAE.pth), or try --dtype fp32", err
    assert not out.exists() and not list(tmp_path.glob("*.part*"))
