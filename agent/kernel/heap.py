"""Hand the C heap's free pages back to the kernel (glibc `malloc_trim`).

libnftables parses a whole transaction in process: a full sync of 10k Services allocates hundreds
of MB that it frees again, but glibc keeps freed heap mapped, so the agent's resident size stays at
its peak until the next allocation reuses it. Trimming after such a transaction returns it."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("agent.kernel.heap")
_libc: ctypes.CDLL | None = None


def trim() -> bool:
    """True when glibc released memory (False where there is no glibc, e.g. musl)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(_libc.malloc_trim(0))
    except (OSError, AttributeError) as exc:
        log.debug("malloc_trim unavailable: %s", exc)
        return False
