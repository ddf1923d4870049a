"""The checkout never shadows an installed distribution, whatever the entry point, and the venv is the lock's.

The repository root is the package `flf2v` and its folders (kernels/, models/, export/, runtime/, bench/) are
its subpackages. An entry point that puts the working directory on sys.path (`python -c`, `python -m
pytest`, `torchrun --no-python python ...`) started in the root would let a folder holding an `__init__.py`
win over an installed package of the same name: transformers 5.25 imports Hugging Face's `kernels`, and got
ours. The folders are namespace packages (no `__init__.py`), which the import system only uses when no
regular package of that name exists anywhere on the path; these tests import every top-level name the venv's
distributions install, from the root and from an empty folder, and compare.
"""
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Fills `out` with {name: [the paths it resolves to, None]} for `names`, without importing them.
RESOLVE = r"""
import importlib.util
for name in names:
    try:
        spec = importlib.util.find_spec(name)
        out[name] = [None if spec is None else [spec.origin, *(spec.submodule_search_locations or [])], None]
    except (ImportError, ValueError) as e:
        out[name] = [None, type(e).__name__]
"""
# A process's answer for the names in argv[1] (JSON); with argv[2] "import", how importing each ends.
PROBE = "import importlib, json, sys, warnings\nwarnings.simplefilter('ignore')\n" \
        "names, out = json.loads(sys.argv[1]), {}\n" + RESOLVE + r"""
if sys.argv[2] == "import":
    for name in out:
        try:
            importlib.import_module(name)
            out[name][1] = "ok"
        except BaseException as e:  # what fails from an empty folder must fail alike from the root
            out[name][1] = type(e).__name__
print("PROBE" + json.dumps(out))
"""


def installed_top_level_names() -> list[str]:
    """Every top-level module or package a distribution in this environment installs (from its RECORD)."""
    names = set()
    for dist in md.distributions():
        if dist.metadata["Name"] == "flf2v":  # ours (also its flf2v.egg-info in the root, under `python -m`)
            continue
        for f in dist.files or ():
            first = f.parts[0]
            if first in ("..", "__pycache__") or first.endswith((".dist-info", ".data", ".egg-info")):
                continue
            if len(f.parts) > 1 or first.endswith((".py", ".so")):
                names.add(first.split(".")[0])
    return sorted(n for n in names if n.isidentifier() and not n.startswith("__editable__"))


def probe(cmd: list[str], cwd: Path, names: list[str], mode: str) -> dict:
    r = subprocess.run([*cmd, PROBE, json.dumps(names), mode], cwd=cwd, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": "", "TRITON_INTERPRET": ""})
    line = next((x for x in r.stdout.splitlines() if x.startswith("PROBE")), None)
    assert r.returncode == 0 and line, f"{' '.join(cmd)} in {cwd}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    return json.loads(line[len("PROBE"):])


def in_checkout(where) -> list[str]:
    """The paths of a resolution that lie in the checkout but outside the venv (which may live in it)."""
    venv = Path(sys.prefix).resolve()
    paths = [Path(p).resolve() for p in where or () if p and Path(p).is_absolute()]  # not "built-in"
    return [str(p) for p in paths if p.is_relative_to(ROOT) and not p.is_relative_to(venv)]


def shadowed(found: dict) -> dict:
    """{name: its paths in the checkout} of a probe's {name: [where, outcome]}."""
    return {n: in_checkout(w) for n, (w, _) in found.items() if in_checkout(w)}


@pytest.fixture(scope="module")
def names():
    names = installed_top_level_names()
    assert {"torch", "transformers", "kernels", "onnxruntime"} <= set(names), names
    return names


def test_no_installed_name_is_shadowed_by_python_c_in_the_root(names, tmp_path):
    """`python -c` in the root: every name resolves and imports as it does from an empty folder."""
    root = probe([sys.executable, "-c"], ROOT, names, "import")
    away = probe([sys.executable, "-c"], tmp_path, names, "import")
    assert not shadowed(root), f"installed names resolved into the checkout: {shadowed(root)}"
    differ = {n: (away[n][1], root[n][1]) for n in names if away[n][1] != root[n][1]}
    assert not differ, f"imports that end differently in the root (empty folder, root): {differ}"
    print(f"{len(names)} top-level names; {sum(v[1] == 'ok' for v in root.values())} import here")


def test_no_installed_name_is_shadowed_in_this_pytest_process(names):
    """The process `make test` / `python -m pytest` / `pytest` started (its sys.path as pytest made it)."""
    found = {}
    exec(compile(RESOLVE, "resolve", "exec"), {"names": names, "out": found})
    assert not shadowed(found), (f"installed names resolved into the checkout under pytest: {shadowed(found)} "
                                 f"(sys.path {sys.path})")


def test_no_installed_name_is_shadowed_by_torchrun_in_the_root(names):
    """torchrun's worker processes started in the root (`torchrun --no-python python -c ...`)."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "1", "--no-python",
           sys.executable, "-c"]
    found = probe(cmd, ROOT, names, "resolve")
    assert not shadowed(found), f"torchrun in the root: installed names resolved into the checkout: {shadowed(found)}"


def test_no_installed_name_is_shadowed_by_plain_pytest_in_the_root(names, tmp_path):
    """The `pytest` console script started in the root on a file in tests/ (so with tests/ on sys.path and
    tests/conftest.py loaded, as `pytest tests/test_x.py` runs)."""
    found = _pytest_probe(Path(sys.executable).parent, tmp_path, names)
    assert not shadowed(found), f"pytest in the root: installed names resolved into the checkout: {shadowed(found)}"


def _pytest_probe(bindir: Path, tmp_path: Path, names: list[str]) -> dict:
    names_file = tmp_path / "names.json"
    names_file.write_text(json.dumps(names))
    test = ROOT / "tests" / f"_probe_shadow_{os.getpid()}.py"  # not test_*: never collected by the suite
    test.write_text("import json\ndef test_probe():\n"
                    f"    names, out = json.load(open({str(names_file)!r})), {{}}\n"
                    + "".join(f"    {line}\n" for line in RESOLVE.strip().splitlines())
                    + "    print('PROBE' + json.dumps(out))\n")
    try:
        r = subprocess.run([str(bindir / "pytest"), "-q", "-s", "-p", "no:cacheprovider", "-p", "no:xdist",
                            str(test.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": ""})
    finally:
        test.unlink()
    line = next((x for x in r.stdout.splitlines() if x.startswith("PROBE")), None)
    assert r.returncode == 0 and line, r.stdout + r.stderr
    return json.loads(line[len("PROBE"):])


def test_flf2v_imports_light_and_exports_the_pipeline():
    code = ("import sys, flf2v; assert 'torch' not in sys.modules, 'import flf2v loaded torch';"
            "from flf2v import Pipeline; from flf2v.runtime.pipeline import Pipeline as P; assert Pipeline is P;"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_installed_versions_are_the_locks():
    """`make setup` installs its lock exactly (a drifted venv would hide what a fresh clone gets): the one it
    recorded in $(VENV)/.lock, lock/cpu.txt on CI."""
    record = Path(sys.prefix) / ".lock"
    if not record.is_file():
        pytest.skip(f"{sys.prefix} was not made by `make setup` (no .lock record)")
    lock, ort = record.read_text().split()
    if lock == "none":
        pytest.skip("`make setup LOCK=none` (or `make lock`) installed the newest versions")
    want = {}
    for line in (ROOT / lock).read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        if m:
            want[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    if ort == "ORT=gpu":
        want.pop("onnxruntime", None)  # replaced by onnxruntime-gpu
    assert len(want) > 50, f"{lock}: {len(want)} pins"

    def installed(name):  # the first on sys.path, as an import finds it (setuptools appends its _vendor)
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None
    have = {n: installed(n) for n in want}
    wrong = {n: (v, have[n]) for n, v in want.items() if have[n] is None or have[n].split("+")[0] != v.split("+")[0]}
    assert not wrong, f"installed versions differ from {lock} (locked, installed): {wrong}; run `make setup`"
