"""Stopping a command by a signal the way Ctrl-C stops it: every `finally` runs, so no temp
file is left, and the command can say what it kept."""

from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def stop_on(number: int):
    """While inside, signal `number` stops like Ctrl-C (a KeyboardInterrupt, so every
    `finally` runs: no temp file left) and its name is appended to the yielded list."""
    stopped: list[str] = []

    def handler(signum, frame):
        stopped.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(number, handler)
    except ValueError:  # not the main thread: leave the default
        yield stopped
        return
    try:
        yield stopped
    finally:
        signal.signal(number, previous)
