"""Writes the pins `make setup` installs (lock/cpu.txt, cu13.txt, cu12.txt) from a venv the suite passed in.

Run by `make lock` after `make test` passed in that venv, which `make setup LOCK=none` filled with the
newest versions the registries serve:
  cpu   the venv itself (`pip freeze`);
  cu13  what pip resolves from PyPI for `torch` + `.[dev,gpu-cu13]` (PyPI's torch is the CUDA 13 build),
        the packages shared with the CPU set held at the CPU set's versions; TensorRT's three wheels are
        NVIDIA's stubs (they fetch from NVIDIA's index at install time), so they are pinned by version only;
  cu12  the CPU set without triton (PyTorch's cu128 wheel of the same torch version pins its triton and
        CUDA libraries exactly) plus the gpu-cu12 extra.
Usage: python lock/refresh.py --venv .venv-lock --torch 2.13.0 --trt 11.4.0.106
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("# {flavour} pins for `make setup` (Python {py}); written by `make lock` on {date} after the suite passed "
          "with them ({how}).\n# Refresh with `make lock`; never edit by hand.\n")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def freeze(venv: Path, torch: str) -> dict[str, str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--all", "--exclude-editable"],
                         check=True, capture_output=True, text=True).stdout
    pins = {}
    for line in out.splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if m and norm(m[1]) not in ("pip", "flf2v"):
            pins[norm(m[1])] = torch if norm(m[1]) == "torch" else m[2]  # 2.13.0+cpu: the CPU index's name
    return pins


def extra(name: str) -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][name]


def resolve_cu13(venv: Path, cpu: dict[str, str], torch: str) -> dict[str, str]:
    """PyPI's resolution for the CUDA 13 flavour, with no local wheel folder or cap in the way."""
    held = {n: v for n, v in cpu.items() if n not in ("torch", "triton", "setuptools") and
            not n.startswith(("nvidia-", "cuda-"))}
    wanted = [f"torch=={torch}", f"{ROOT}[dev]"] + [r for r in extra("gpu-cu13") if not r.startswith("tensorrt")]
    with tempfile.TemporaryDirectory() as tmp:
        cons, report = Path(tmp) / "constraints.txt", Path(tmp) / "report.json"
        cons.write_text("".join(f"{n}=={v}\n" for n, v in held.items()))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--ignore-installed",
                        "--quiet", "--report", str(report), "-c", str(cons), *wanted], check=True, env=env)
        items = json.loads(report.read_text())["install"]
    return {norm(i["metadata"]["name"]): i["metadata"]["version"] for i in items
            if norm(i["metadata"]["name"]) != "flf2v"}


def trt_pins(flavour: str, version: str) -> dict[str, str]:
    return {f"tensorrt-{flavour}{part}": version for part in ("", "-bindings", "-libs")}


def write(flavour: str, pins: dict[str, str], how: str) -> None:
    path = ROOT / "lock" / f"{flavour}.txt"
    head = HEADER.format(flavour=flavour, py=".".join(map(str, sys.version_info[:2])),
                         date=time.strftime("%Y-%m-%d"), how=how)
    tmp = path.with_suffix(".part")
    tmp.write_text(head + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(ROOT)}: {len(pins)} pins")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", type=Path, required=True)
    ap.add_argument("--torch", required=True)
    ap.add_argument("--trt", required=True)
    args = ap.parse_args()
    cpu = freeze(args.venv, args.torch)
    cu13 = resolve_cu13(args.venv, cpu, args.torch) | trt_pins("cu13", args.trt)
    gpu12 = [r.split("==") for r in extra("gpu-cu12") if "==" in r and not r.startswith("tensorrt")]
    cu12 = {n: v for n, v in cpu.items() if n != "triton"} | {norm(n): v for n, v in gpu12} \
        | trt_pins("cu12", args.trt)
    write("cpu", cpu, "`make test` in the venv")
    write("cu13", cu13, "the CPU set's shared versions; resolved on PyPI, not run on a GPU")
    write("cu12", cu12, "the CPU set's shared versions; torch's CUDA 12 libraries are torch's own pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
