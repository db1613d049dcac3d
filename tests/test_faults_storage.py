"""Faults of stored files (issue 21, section 8) and of the slot cache's memory (section 6):
locks on shared outputs, indexes written as a set, damaged model directories, the KV cache
allocated by need."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from polymodal.errors import UserError
from polymodal.locks import exclusive


def test_a_held_lock_refuses_a_second_holder_naming_the_holder(tmp_path):
    lock = tmp_path / "thing.lock"
    with exclusive(lock, "the thing"):
        with pytest.raises(UserError) as error, exclusive(lock, "the thing"):
            pass
        message = str(error.value)
        assert "the thing" in message and str(lock) in message
        assert f"pid {os.getpid()}" in message and "\n" not in message
    with exclusive(lock, "the thing"):  # released on exit: taken again
        pass


def test_a_lock_held_by_another_process_is_refused_and_dies_with_it(tmp_path):
    lock = tmp_path / "thing.lock"
    code = ("import sys, time; from pathlib import Path; from polymodal.locks import exclusive\n"
            "with exclusive(Path(sys.argv[1]), 'x'):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {holder.pid}"), exclusive(lock, "x"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(lock, "x"):  # a killed holder leaves no stale lock
        pass
