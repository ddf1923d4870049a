"""Faults and fuzzing: a full disk, hostile bytes in images and checkpoint headers, random CLI flags."""
import json
import os
import resource
import signal
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from flf2v.models import checkpoint as ck
from flf2v.runtime.cli import build_parser, check_args
from flf2v.runtime.media import InputError, load_image


def _limit_file_size():
    # a size-limited target: writes past 4 KiB fail with EFBIG instead of killing the process
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_full_disk_leaves_no_partial_video(tiny_ckpt, demo_frames, tmp_path):
    out = tmp_path / "v.mp4"
    cmd = [sys.executable, "-m", "flf2v.runtime.cli", "--ckpt_dir", str(tiny_ckpt), "--first_frame",
           str(demo_frames[0]), "--last_frame", str(demo_frames[1]), "--prompt", "x", "--size", "64*64",
           "--frame_num", "9", "--sample_steps", "1", "--save_file", str(out), "--quiet", "--backend", "torch"]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_file_size, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "no video was written" in err[0], r.stderr
    assert list(tmp_path.iterdir()) == [], "partial output left behind"


def test_decompression_bomb_is_refused(tmp_path):
    Image.new("1", (9000, 8000)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="downscale"):
        load_image(tmp_path / "big.png")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_image_loader_fuzz(tmp_path, data):
    p = tmp_path / "fuzz.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + data if data[:1] == b"\x00" else data)
    try:
        im = load_image(p)
    except InputError:
        return
    assert im.mode == "RGB"


_flag = st.sampled_from(["--size", "--frame_num", "--sample_steps", "--sample_shift", "--sample_guide_scale",
                         "--base_seed", "--sample_solver", "--task", "--backend", "--prompt", "--offload_model"])
_value = st.one_of(st.text(max_size=12), st.integers(-2**70, 2**70).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(str))


@settings(max_examples=150, deadline=None)
@given(pairs=st.lists(st.tuples(_flag, _value), max_size=5))
def test_cli_parser_fuzz(pairs):
    argv = ["--ckpt_dir", "c", "--first_frame", "a.png", "--last_frame", "b.png", "--prompt", "p"]
    for f, v in pairs:
        argv += [f, v]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 2
        return
    try:
        check_args(args)
    except InputError as e:
        assert "\n" not in str(e)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.binary(max_size=256), which=st.sampled_from(["shard", "index", "config"]))
def test_checkpoint_header_fuzz(tmp_path, header, which):
    d = tmp_path / "c"
    d.mkdir(exist_ok=True)
    (d / ck.DIT_CONFIG).write_text(json.dumps({"model_type": "flf2v", "dim": 64}))
    shard = "diffusion_pytorch_model-00001-of-00001.safetensors"
    (d / ck.DIT_INDEX).write_text(json.dumps({"weight_map": {"a": shard}}))
    # a safetensors file is an 8-byte little-endian header length, then a JSON header
    (d / shard).write_bytes(len(header).to_bytes(8, "little") + header)
    if which == "index":
        (d / ck.DIT_INDEX).write_bytes(header)
    elif which == "config":
        (d / ck.DIT_CONFIG).write_bytes(header)
    try:
        ck.read_dit_config(d)
        ck.dit_tensor_source(d)
    except ck.CheckpointError as e:
        assert "\n" not in str(e)


# A real SIGINT while the script imports torch (the first second or more of every command): the finder asks
# for it at the moment the import machinery looks torch up, as a user's Ctrl-C would land.
_SIGINT_ON_TORCH = """
import importlib.abc, os, signal, sys
from importlib.metadata import entry_points
signal.signal(signal.SIGINT, signal.default_int_handler)
class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, Finder())
sys.exit(next(e for e in entry_points(group="console_scripts") if e.name == sys.argv[1]).load()(["--help"]))
"""


@pytest.mark.parametrize("command", ["flf2v-run", "flf2v-build", "flf2v-make-tiny", "flf2v-bench",
                                     "flf2v-calibrate-cache"])
def test_ctrl_c_while_a_command_imports_is_one_line_and_exit_130(command, tmp_path):
    # cwd: outside the checkout, whose own *.egg-info (a build's leftover) would name the entry points
    p = subprocess.run([sys.executable, "-c", _SIGINT_ON_TORCH, command], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert (p.returncode, p.stderr.strip()) == (130, f"{command}: error: interrupted"), p.stderr[-2000:]


_CTRL_C_IN_EXEC = """
import sys
from flf2v import log
try:
    exec("raise KeyboardInterrupt")  # as in dataclasses' generated methods, while a lazy import runs
except KeyboardInterrupt as e:
    sys.exit(log.stopped("flf2v-build", e))
"""


def test_ctrl_c_answered_after_an_exec_exits_130_not_by_sigint(tmp_path):
    """`python -m flf2v.export.build` interrupted mid-export printed its line, then died of SIGINT (-2, ~1 in 20):
    CPython had marked the Ctrl-C unhandled when it left an exec() of a string."""
    (tmp_path / "stop_in_exec.py").write_text(_CTRL_C_IN_EXEC)
    p = subprocess.run([sys.executable, "-m", "stop_in_exec"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert (p.returncode, p.stderr.strip()) == (130, "flf2v-build: error: interrupted"), (p.returncode, p.stderr)


def test_sigterm_to_a_command_is_one_line_and_exit_143(monkeypatch, capsys):
    """kill / docker stop / a scheduler: the default action ended a command where it stood, silent, its temporary
    files left; now it runs a Ctrl-C's clean-up and says so."""
    import threading
    import time

    from flf2v import entry
    from flf2v.models import make_tiny
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only; this test's SIGTERM would end the test process")
    before = signal.getsignal(signal.SIGTERM)

    def killed(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises here
        return 0
    monkeypatch.setattr(make_tiny, "main", killed)
    assert entry.make_tiny([]) == 143
    assert capsys.readouterr().err.strip() == "flf2v-make-tiny: error: terminated (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler back


def test_a_quoted_tilde_is_refused_not_made_a_folder(tiny_ckpt, demo_frames, tmp_path, monkeypatch, capsys):
    """A quoted `~/out.mp4` made a folder named `~` in the current one and said "wrote ~/out.mp4" (flf2v-run,
    flf2v-make-tiny and flf2v-build alike)."""
    from helpers import _args, run

    from flf2v.export.build import main as build_main
    from flf2v.models.make_tiny import main as make_tiny_main
    monkeypatch.chdir(tmp_path)
    home = os.path.expanduser("~")
    for main, argv, prog in ((run, _args(tiny_ckpt, demo_frames, "~/v.mp4"), "flf2v-run"),
                             (run, _args(tiny_ckpt, demo_frames, "v.mp4", "--metrics", "~/m.json"), "flf2v-run"),
                             (make_tiny_main, ["~/ckpt"], "flf2v-make-tiny"),
                             (build_main, ["--ckpt_dir", str(tiny_ckpt), "--out", "~/engines", "-q"], "flf2v-build")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"{prog}: error: ") and "'~' is not expanded here" in err[0] \
            and f"write {home}/" in err[0], (argv, err)
    assert list(tmp_path.iterdir()) == []
    from flf2v.runtime.media import check_output
    check_output("--save_file", "./~/v.mp4")  # a folder '~' asked for as such


def test_make_tiny_into_the_current_folder_keeps_it(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """`flf2v-make-tiny .` swapped the folder out from under its own (and the shell's) working directory, which
    was then a deleted one: `ls` found nothing, the next command "No such file or directory (.)"."""
    from flf2v.export.build import main as build_main
    from flf2v.models.make_tiny import main as make_tiny_main
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for i in range(2):  # new, then over the earlier checkpoint beside a file of the user's
        assert make_tiny_main(["."]) == 0, i
        assert os.path.samefile(os.getcwd(), here) and (here / "flf2v_tiny.json").is_file(), i
        assert not [p for p in tmp_path.iterdir() if p != here], i  # no temporary folder left
        (here / "notes.txt").write_text("mine")
    assert (here / "notes.txt").read_text() == "mine"
    assert build_main(["--ckpt_dir", str(tiny_ckpt), "--out", ".", "-q"]) == 2  # the '~' check indexed no parts
    assert "--out . is a checkpoint folder" in capsys.readouterr().err
