"""The console scripts. Each imports its command's module only once inside a guard: that import (torch and
the networks) takes a second or more, and a Ctrl-C landing in it, anywhere a command has no handler of its
own, or in a __del__ (log.keep_ctrl_c), is one line and exit 130 like an interrupted run, not a traceback."""
from __future__ import annotations

import atexit
import importlib
import signal

from flf2v import log


def _command(prog: str, target: str, argv: list[str] | None) -> int:
    module, name = target.split(":")
    stop = None
    with log.keep_ctrl_c(), log.sigterm_as_ctrl_c():
        try:
            code = getattr(importlib.import_module(module), name)(argv)
        except BaseException as e:  # noqa: B036 - only a Ctrl-C is answered here; everything else goes on up
            if not (stop := log.ctrl_c(e)):
                raise
            code = None
        lost = log.ctrl_c_lost()
    # From here all is written (or not): a Ctrl-C in the interpreter's exit was a traceback from torch's atexit
    # finalizers, with exit 0. The last handler registered runs first.
    atexit.register(signal.signal, signal.SIGINT, signal.SIG_IGN)
    if code is None or code == 0 and lost:  # what it wrote, it wrote whole (atomic writes)
        return log.stopped(prog, stop)
    return code


def run(argv: list[str] | None = None) -> int:
    return _command("flf2v-run", "flf2v.runtime.cli:main", argv)


def build(argv: list[str] | None = None) -> int:
    return _command("flf2v-build", "flf2v.export.build:main", argv)


def make_tiny(argv: list[str] | None = None) -> int:
    return _command("flf2v-make-tiny", "flf2v.models.make_tiny:main", argv)


def bench(argv: list[str] | None = None) -> int:
    return _command("flf2v-bench", "flf2v.bench.cli:main", argv)


def calibrate_cache(argv: list[str] | None = None) -> int:
    return _command("flf2v-calibrate-cache", "flf2v.runtime.calibrate_cache:main", argv)
