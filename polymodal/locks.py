"""One writer at a time on a shared output (an index, a run directory): an exclusive lock file.

Why `fcntl.flock` and not a library: the lock must also say who holds it (pid and command
line) so the second writer's one-line error names the holder; flock gives that with a few
lines, and the kernel drops the lock when the holder dies (even by `kill -9`), so a crash
never leaves a stale lock behind. The lock file itself stays on disk between runs: removing
it while another process waits on it would let two writers hold two different files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from polymodal.errors import UserError


def _holder(handle) -> str:
    """What the lock file says about its holder ('pid 123: polymodal index add ...'), or ''."""
    try:
        handle.seek(0)
        text = handle.read(4096).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return " ".join(text.split())


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on the lock file `path` for the `with` block.

    `path`'s parent folder must exist; the file is created if missing. While held, the
    file names this process (pid and command line). Raises UserError naming `what`, the
    lock file and, when known, the holder's pid and command line, if another process (or
    another `exclusive` on the same file in this process) holds it.
    """
    path = Path(path)
    try:
        handle = open(path, "a+b")  # noqa: SIM115 -- held for the whole block
    except OSError as error:
        raise UserError(f"{path}: cannot open the lock file for {what}: {error.strerror}") from None
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            named = f" by {holder}" if holder else ""
            raise UserError(
                f"{what} is in use{named} (lock file {path}); wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n".encode())
        handle.flush()
        try:
            yield
        finally:
            # Cleared while still held, so a later reader never names a finished process.
            handle.seek(0)
            handle.truncate()
            handle.flush()
    finally:
        handle.close()  # closing the last descriptor releases the flock
