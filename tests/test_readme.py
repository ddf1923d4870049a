"""The README's links and commands are real: every link to a section or file resolves, every `--flag` shown
with one of the project's commands is one that command accepts, every `make` target exists."""
import argparse
import re
import shutil
import subprocess
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from flf2v.bench.cli import MODES

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "engines" / "README.md"]
COMMANDS = sorted((e.name for e in entry_points(group="console_scripts") if e.value.startswith("flf2v.")),
                  key=len, reverse=True)
# flf2v-bench's first word picks a mode with a parser of its own (bench/cli.py; the stage comparison has none)
BENCH_MODES = tuple(m for m in MODES if m)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, markup and punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m[1] or "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(text: str) -> list[str]:
    body = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return [m[1] for m in re.finditer(r"^#{1,6} +(.+?) *$", body, flags=re.M)]


def command_lines(text: str) -> list[str]:
    """Code-block lines (joined over trailing backslashes, comments dropped) and inline code spans."""
    lines, blocks = [], re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            lines.append(re.sub(r"(^|\s)#.*$", "", line))
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    lines += re.findall(r"`([^`\n]+)`", prose)
    return lines


def uses(line: str) -> list[tuple[str, str, str]]:
    """(command, mode, its argument text) for each of the project's commands on a line; the arguments run
    to the next command, pipe or `&&`."""
    pat = r"(?:^|(?<=[\s/]))(" + "|".join(map(re.escape, COMMANDS)) + r")(?=\s|$)"
    out = []
    for part in re.split(r"&&|\|\||[|;]", line):
        hits = list(re.finditer(pat, part))
        for i, m in enumerate(hits):
            args = part[m.end():hits[i + 1].start() if i + 1 < len(hits) else len(part)]
            words = args.split()
            mode = words[0] if m[1] == "flf2v-bench" and words and words[0] in BENCH_MODES else ""
            out.append((m[1], mode, args))
    return out


class _Parsed(Exception):
    pass


def options_of(command: str, mode: str, monkeypatch) -> set[str]:
    """The option strings of a command's parser: its entry point runs until it parses its arguments."""
    seen = {}

    def capture(self, args=None, namespace=None):
        seen["parser"] = self
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    main = next(e for e in entry_points(group="console_scripts") if e.name == command).load()
    with pytest.raises(_Parsed):
        main([mode] if mode else [])
    return set(seen["parser"]._option_string_actions)


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc):
    text = doc.read_text()
    anchors = {anchor(h) for h in headings(text)}
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, frag = target.partition("#")
        if path:
            if not (doc.parent / path).exists():
                bad.append(f"{target}: no file {path}")
            continue
        if frag not in anchors:
            bad.append(f"#{frag}: no such section")
    for quoted in re.findall(r'[Ss]ee (?:the README\'s )?"([^"]+)"', prose):
        if not any(quoted in h for h in headings((ROOT / "README.md").read_text())):
            bad.append(f'see "{quoted}": no such section')
    assert not bad, f"{doc.name}: " + "; ".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_flags_and_targets_exist(doc, monkeypatch):
    text = doc.read_text()
    known, bad, checked = {}, [], 0
    for line in command_lines(text):
        for command, mode, args in uses(line):
            if (command, mode) not in known:
                known[command, mode] = options_of(command, mode, monkeypatch)
            for flag in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", args):
                checked += 1
                if flag not in known[command, mode]:
                    bad.append(f"{command}{' ' + mode if mode else ''} {flag}")
        for target in re.findall(r"(?:^|\s)make ((?:[a-z][\w-]*)(?: [a-z][\w-]*)*)", line):
            bad += [f"make {t}" for t in target.split() if t not in make_targets()]
    assert not bad, f"{doc.name} shows flags or targets that do not exist: {sorted(set(bad))}"
    if doc.name == "README.md" and doc.parent == ROOT:
        assert checked > 50, f"only {checked} flags found: the README parser lost the commands"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_engines_reads_0_as_off():
    """`make engines FORCE=0` passed --force (any value was on): it replaced another checkpoint's engines."""
    def build_line(*flags):
        out = subprocess.run(["make", "-s", "-n", "-o", "setup", "-C", str(ROOT), "engines", "CKPT=x",
                              "VENV=/no-venv", *flags], capture_output=True, text=True, check=True).stdout
        return " ".join(out.replace("\\\n", " ").split())
    for value in ("0", "false", "no", ""):
        line = build_line(f"FORCE={value}", f"STREAM={value}")
        assert "--force" not in line and "--weight_streaming" not in line, (value, line)
    line = build_line("FORCE=1", "STREAM=1")
    assert "--force" in line and "--weight_streaming" in line, line
