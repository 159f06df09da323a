"""Reading and writing sysctls of the caller's network namespace through /proc/sys."""

from __future__ import annotations

from pathlib import Path


def path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read(name: str) -> str:
    return path(name).read_text().strip()


def ensure(name: str, value: str) -> bool:
    """Set `name` to `value` unless it already is; True when it was changed. OSError when it cannot
    be read or written (a missing module, a read-only /proc/sys)."""
    p = path(name)
    if p.read_text().strip() == value:
        return False
    p.write_text(value + "\n")
    return True
