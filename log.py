"""The library's logger, quiet unless a program asks: `logger` has a NullHandler, as a library's should, so an
application that configures logging sees flf2v's records and one that does not sees nothing. The commands
(`flf2v-run`, `flf2v-build`, `flf2v-calibrate-cache`) call `setup` with their -v / -q count.

User-facing results (the "wrote ..." line, one-line errors) are printed by the commands, not logged."""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading

logger = logging.getLogger("flf2v")
logger.addHandler(logging.NullHandler())

LEVELS = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}  # 2 and more: DEBUG


class _Stderr(logging.StreamHandler):
    """Writes to the sys.stderr of the moment, not the one at setup: tests (and callers) swap it, and a
    command run twice in one process must not write to the first run's stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _OneLine(logging.Formatter):
    """`prog: message`; warnings and errors as the commands say theirs, `prog: warning: message`."""

    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{self.prog}: {level}{record.getMessage()}"


def setup(verbosity: int, prog: str = "flf2v") -> None:
    """Log to stderr, one line a record: -1 (-q) errors only, 0 warnings, 1 (-v) info, 2 (-vv) debug. Called
    again (a second command in one process) it replaces its handler instead of adding another."""
    for h in [h for h in logger.handlers if isinstance(h, _Stderr)]:
        logger.removeHandler(h)
    handler = _Stderr()
    handler.setFormatter(_OneLine(prog))
    logger.addHandler(handler)
    logger.setLevel(LEVELS.get(verbosity, logging.DEBUG if verbosity > 1 else logging.ERROR))


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `docker stop`, a scheduler) raised as a Ctrl-C is, so every clean-up a Ctrl-C runs runs:
    its default action killed a command where it stood, saying nothing, its temporary files left."""


def _terminate(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """For one command in the main thread (another cannot take signals): SIGTERM raises `Terminated`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ctrl_c(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C (or `Terminated`) `e` comes from, None if none: a KeyboardInterrupt, or the error a torch
    context manager raises in its cleanup when the interrupt lands inside it (the KeyboardInterrupt then is its
    context)."""
    while e is not None and not isinstance(e, KeyboardInterrupt):
        e = e.__context__
    return e


def stop_said(e: KeyboardInterrupt | None) -> tuple[str, int]:
    """(what to say, exit code) of a Ctrl-C (130) or a SIGTERM (`Terminated`, 143) that a command answers."""
    # CPython 3.11 marks a Ctrl-C "unhandled" whenever a KeyboardInterrupt leaves an exec() of a string
    # (dataclasses' generated methods, in a lazy import mid-export), and at the exit of `python -m ...` kills
    # the process with SIGINT although the command answered it: returncode -2, not 130 (~1 build in 20).
    # An exec() of a string that succeeds clears the mark.
    exec("")  # noqa: S102
    return ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)


def stopped(prog: str, e: KeyboardInterrupt | None, what: str = "") -> int:
    """A command's one line for a Ctrl-C or a SIGTERM (`stop_said`), `what` after it; its exit code."""
    said, code = stop_said(e)
    print(f"{prog}: error: {said}{what}", file=sys.stderr, flush=True)
    return code


_lost: list = []


@contextlib.contextmanager
def keep_ctrl_c():
    """For one command: Python prints and drops an exception raised in a __del__ or a weakref callback
    (`sys.unraisablehook`), and the garbage collector runs those anywhere, so a Ctrl-C landing there was a
    traceback and a run that went on to write its video. Such a Ctrl-C is kept instead, for `ctrl_c_lost`."""
    def hook(u):
        if isinstance(u.exc_value, KeyboardInterrupt):
            _lost.append(u.exc_value)
        else:
            previous(u)
    previous, sys.unraisablehook = sys.unraisablehook, hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
        _lost.clear()


def ctrl_c_lost() -> bool:
    """Whether a Ctrl-C was dropped in a __del__ inside `keep_ctrl_c` (the command then stops as interrupted)."""
    return bool(_lost)
