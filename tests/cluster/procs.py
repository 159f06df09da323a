"""Child processes and host objects the harness owns, and how they are always cleaned up.

Every process is started with PR_SET_PDEATHSIG=SIGKILL (it dies with the harness even if the
harness is SIGKILLed) and an environment marker ``KPA_HARNESS_RUN=<run tag>``. Every run records
what it created (network namespaces, root-namespace links) in ``<run dir>/state.json``; a later run
finds runs whose owner died and removes what they left (`sweep_stale`), so nothing accumulates.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

RUN_ROOT = Path(os.environ.get("KPA_HARNESS_TMP", "/tmp"))
RUN_PREFIX = "kpa-harness-"
MARKER = "KPA_HARNESS_RUN"
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Proc:
    """One long-running child (optionally inside a network namespace), restartable."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, run_tag: str, netns: str | None = None,
                 env: dict[str, str] | None = None, keep_sys: bool = False) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.netns = netns
        # nsenter instead of `ip netns exec`, whose fresh /sys hides /sys/fs/bpf (the eBPF mode)
        self.keep_sys = keep_sys
        self.env = {**os.environ, **(env or {}), MARKER: run_tag}
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Proc:
        assert not self.running(), f"{self.name} already running"
        enter = ["nsenter", f"--net=/run/netns/{self.netns}"] if self.keep_sys else ["ip", "netns", "exec", self.netns]
        argv = (enter if self.netns else []) + self.argv
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            out.write(f"\n=== start {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
            out.flush()
            # `ip netns exec` execs the command, so the pid is the program's own.
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        self.starts += 1
        _REGISTRY.add(self)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            assert self.popen is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL, no chance to clean up (what a crash or an OOM kill looks like)."""
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait()

    def stop(self, timeout: float = 15) -> None:
        if self.popen is None:
            return
        if self.running():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        _REGISTRY.discard(self)

    def tail(self, n: int = 40) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])


class _Registry:
    """Every live Proc, stopped at interpreter exit whatever happened."""

    def __init__(self) -> None:
        self._procs: list[Proc] = []
        self._lock = threading.Lock()

    def add(self, p: Proc) -> None:
        with self._lock:
            if p not in self._procs:
                self._procs.append(p)

    def discard(self, p: Proc) -> None:
        with self._lock:
            if p in self._procs:
                self._procs.remove(p)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(reversed(self._procs))
        for p in procs:
            p.stop(timeout=5)


_REGISTRY = _Registry()
atexit.register(_REGISTRY.stop_all)


def stop_all_processes() -> None:
    _REGISTRY.stop_all()


def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


# -- what a run created, for the next run to sweep if this one died -------------------------------

class RunState:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "state.json"
        self.data: dict[str, object] = {"owner": os.getpid(), "netns_prefix": "", "links": []}
        self._lock = threading.Lock()
        self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)

    def set(self, key: str, value: object) -> None:
        with self._lock:
            self.data[key] = value
            self._save()

    def add_link(self, name: str) -> None:
        with self._lock:
            links = self.data.setdefault("links", [])
            assert isinstance(links, list)
            links.append(name)
            self._save()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_marked(tag: str) -> int:
    """SIGKILL every process whose environment carries this run's marker."""
    needle = f"{MARKER}={tag}".encode()
    n = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(d.name), signal.SIGKILL)
                n += 1
    return n


def remove_netns_with_prefix(prefix: str) -> list[str]:
    gone: list[str] = []
    if not prefix:
        return gone
    for line in sh("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(prefix):
            for pid in sh("ip", "netns", "pids", name, check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", name, check=False)
            gone.append(name)
    return gone


def sweep_stale(log: object = print) -> None:
    """Remove what earlier runs left behind when their owner process died without cleaning up."""
    for run_dir in sorted(RUN_ROOT.glob(RUN_PREFIX + "*")):
        state = run_dir / "state.json"
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        owner = int(data.get("owner", 0))
        if owner and _alive(owner):
            continue
        tag = run_dir.name[len(RUN_PREFIX):]
        killed = kill_marked(tag)
        gone = remove_netns_with_prefix(str(data.get("netns_prefix", "")))
        for link in data.get("links", []):
            sh("ip", "link", "del", link, check=False)
        assert callable(log)
        log(f"swept stale harness run {tag}: {killed} processes, {len(gone)} namespaces, "
            f"{len(data.get('links', []))} links")
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":  # python -m tests.cluster.procs: remove what dead runs left behind
    sweep_stale()
