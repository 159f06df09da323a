"""The benchmark's process-tree memory: a child that has exec'd counts, a fork that has not is the
proxy's own pages again and does not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.bench.proctree import rss_parts

PARENT = """
import os, subprocess, sys, time
held = bytearray(50 << 20)
subprocess.Popen(["sleep", "5"])
if os.fork() == 0:
    time.sleep(5)
    os._exit(0)
print("ready", flush=True)
time.sleep(5)
"""


def test_forked_child_not_counted_twice_execd_child_counted() -> None:
    proc = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 5
        while True:  # the exec'd child may still carry the parent's name for a moment
            parts = rss_parts(proc.pid)
            names = [n for n, _ in parts]
            if "sleep" in names or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert names[0] == "python3" or names[0].startswith("python")
        assert names.count(names[0]) == 1, parts  # the fork shares the parent's pages
        assert "sleep" in names, parts
        assert parts[0][1] > 50  # the parent's 50 MB are there once
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
