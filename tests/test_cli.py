"""flf2v-run: a video and metrics from the tiny checkpoint; user mistakes end in one line and exit 2."""
import json

import pytest

from flf2v.runtime.cli import main


def run(args):
    try:
        return main(args)
    except SystemExit as e:  # argparse's own errors
        return e.code


def _args(ckpt, frames, out, *extra):
    return ["--ckpt_dir", str(ckpt), "--first_frame", str(frames[0]), "--last_frame", str(frames[1]),
            "--prompt", "a red ball", "--size", "64*64", "--frame_num", "5", "--sample_steps", "2",
            "--base_seed", "3", "--save_file", str(out), "--quiet", "--backend", "torch", *extra]


def test_run_writes_video_and_metrics(tiny_ckpt, demo_frames, tmp_path, capsys):
    out, metrics = tmp_path / "v.mp4", tmp_path / "m.json"
    assert main(_args(tiny_ckpt, demo_frames, out, "--metrics", str(metrics))) == 0
    from flf2v.runtime.media import read_video
    assert read_video(out).shape == (5, 64, 64, 3)
    m = json.loads(metrics.read_text())
    assert m["seed"] == 3 and m["frames"] == 5 and m["memory"]["host_peak_rss_gib"] > 0
    assert {"text_encoder", "denoise", "vae_decode", "save"} <= set(m["seconds"])
    line = capsys.readouterr().out
    assert "wrote" in line and "random weights" in line


@pytest.mark.parametrize("extra,match", [
    (["--frame_num", "8"], "4n+1"),
    (["--size", "1920*1080"], "not supported"),
    (["--sample_steps", "0"], "--sample_steps 0"),
    (["--sample_guide_scale", "nan"], "finite"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--backend", "tpu"], "invalid choice"),
    (["--task", "i2v-14B"], "needs a i2v checkpoint"),
    (["--base_seed", str(2**64)], "out of range"),
    (["--save_file", "x.avi"], "must end in .mp4"),
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


def test_missing_image(tiny_ckpt, demo_frames, tmp_path, capsys):
    args = _args(tiny_ckpt, (tmp_path / "nope.png", demo_frames[1]), tmp_path / "v.mp4")
    assert main(args) == 2
    assert "nope.png not found" in capsys.readouterr().err
