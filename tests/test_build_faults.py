"""Real faults during engine builds: a build process killed mid-export, two builds into one folder."""
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import onnxruntime as ort
import pytest

REDO = ("t5", "clip")


def _build_cmd(ckpt, out):
    return [sys.executable, "-m", "flf2v.export.build", "--ckpt_dir", str(ckpt), "--preset", "tiny", "--out", str(out),
            "--quiet"]


def _forget(folder, names):
    m = json.loads((folder / "manifest.json").read_text())
    for n in names:
        del m["engines"][n]
        (folder / f"{n}.onnx").unlink()
    (folder / "manifest.json").write_text(json.dumps(m))


def _complete(folder):
    m = json.loads((folder / "manifest.json").read_text())
    for name, e in m["engines"].items():
        for f, size in e["files"].items():
            assert (folder / f).stat().st_size == size, f"{f} recorded as finished but has another size"
        ort.InferenceSession(str(folder / e["file"]), providers=["CPUExecutionProvider"])
    return m


def test_killed_build_leaves_nothing_taken_for_finished(tiny_engines, tiny_ckpt, tmp_path):
    work = shutil.copytree(tiny_engines, tmp_path / "e")
    _forget(work, REDO)
    p = subprocess.Popen(_build_cmd(tiny_ckpt, work), stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(work.glob(".*partial*")):  # an export under way
        time.sleep(0.05)
    assert list(work.glob(".*partial*")), "the build never started an export"
    p.send_signal(signal.SIGKILL)
    p.wait()
    m = _complete(work)  # what the manifest calls finished is whole
    assert not set(REDO) <= set(m["engines"]), "the killed build cannot have finished both graphs"
    assert subprocess.run(_build_cmd(tiny_ckpt, work), capture_output=True).returncode == 0
    m = _complete(work)
    assert set(REDO) <= set(m["engines"]) and not list(work.glob(".*partial*"))


@pytest.mark.parametrize("sig,code,says", [("SIGINT", 130, "interrupted;"),
                                           ("SIGTERM", 143, "terminated (SIGTERM);")])  # was silent, .partial left
def test_ctrl_c_is_one_line_exit_130_and_keeps_what_finished(tiny_engines, tiny_ckpt, tmp_path, sig, code, says):
    """SIGINT as a user's terminal sends it, mid-export: one line, exit 130, no partial file, the finished
    engines whole (the same command then builds the rest); SIGTERM (kill, docker stop) alike, exit 143."""
    work = shutil.copytree(tiny_engines, tmp_path / "e")
    _forget(work, REDO)
    p = subprocess.Popen(_build_cmd(tiny_ckpt, work), stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not list(work.glob(".*partial*")):  # an export under way
        time.sleep(0.05)
    assert list(work.glob(".*partial*")), "the build never started an export"
    p.send_signal(getattr(signal, sig))
    err = p.communicate(timeout=120)[1].strip()
    assert p.returncode == code and err.startswith(f"flf2v-build: error: {says}") and "\n" not in err, err
    assert not list(work.glob(".*partial*")), list(work.iterdir())
    _complete(work)
    assert not list(work.glob(".*partial*")), list(work.iterdir())


def test_two_builds_into_one_folder(tiny_engines, tiny_ckpt, tmp_path):
    """While the folder's lock is held (as by a build under way), two more builds into it both wait and
    touch nothing; once it is released they run one after the other and leave a complete folder."""
    from flf2v.export.build import folder_lock

    work = shutil.copytree(tiny_engines, tmp_path / "e")
    _forget(work, REDO[:1])
    before = (work / "manifest.json").read_bytes()
    procs, logs = [], []
    try:
        with folder_lock(work):
            for _ in range(2):
                p = subprocess.Popen(_build_cmd(tiny_ckpt, work), stderr=subprocess.PIPE, text=True)
                log = []
                threading.Thread(target=lambda p=p, log=log: log.extend(p.stderr), daemon=True).start()
                procs.append(p)
                logs.append(log)
            deadline = time.time() + 180
            while time.time() < deadline and not all(_waiting(log) for log in logs):
                if any(p.poll() is not None for p in procs):
                    break
                time.sleep(0.05)
            state = [(p.poll(), _waiting(log)) for p, log in zip(procs, logs)]
            assert all(w for _, w in state), f"a build did not wait for the folder lock: (exit code, waited) {state}"
            # nothing changed while the lock was held
            assert (work / "manifest.json").read_bytes() == before
            assert not (work / f"{REDO[0]}.onnx").exists() and not list(work.glob(".*partial*"))
        codes = [p.wait(timeout=300) for p in procs]
        assert codes == [0, 0], ["".join(log) for log in logs]
    finally:
        for p in procs:  # a build that did not wait may still be running when an assertion fails
            if p.poll() is None:
                p.kill()
                p.wait()
    m = _complete(work)
    assert REDO[0] in m["engines"] and not list(work.glob(".*partial*"))


def _waiting(log: list[str]) -> bool:
    return any("waiting for another build" in line for line in log)


def test_verbose_build_logs_its_steps_and_an_interrupted_force_build_says_to_drop_force(tiny_ckpt, tmp_path, capsys,
                                                                                       monkeypatch):
    """-v promised "the steps" and printed nothing; after Ctrl-C, "the same command builds the rest" with --force
    rebuilt the finished engines too (hours at 14B)."""
    from flf2v.export import build as B
    out = tmp_path / "e"
    args = ["--ckpt_dir", str(tiny_ckpt), "--preset", "tiny", "--out", str(out), "--graphs", "t5", "-v"]
    assert B.main(args) == 0
    said = capsys.readouterr()
    err = said.err
    assert said.out == f"{out}: 1 engine current: 1 built now, 0 kept\n", said.out  # "current" alone, built or not
    assert "flf2v-build: t5: exporting\n" in err, err
    assert re.search(r"flf2v-build: t5: done in [\d.]+ s, [\d.]+ MB\n", err), err
    assert B.main(args) == 0
    said = capsys.readouterr()
    assert "flf2v-build: t5: current, kept\n" in said.err and said.out == f"{out}: 1 engine current: 0 built now, 1 kept\n"
    monkeypatch.setattr(B.Plan, "build_one", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    for extra, says in (([], "the same command builds the rest"),
                        (["--force"], "the same command without --force builds the rest")):
        assert B.main(args[:-3] + ["-q"] + extra) == 130
        err = capsys.readouterr().err.strip()
        assert err == f"flf2v-build: error: interrupted; the engines finished are kept, {says}", err
