"""`python -m agent.backends.ebpf.compile PIN_DIR STAGED`: compile lb.c with bcc and load it, in a
process of its own that exits right after.

The maps are pinned under PIN_DIR by lb.c itself (an existing pin is reused, with its entries);
each program is loaded and pinned at STAGED/<name>, where the agent picks it up to attach. The
agent never imports bcc: LLVM would stay mapped in it (about 65 MB resident to import, 120 MB
after compiling even with the heap trimmed), on top of the 10k-Service model and its first sync.
Exit status 0, or 1 with one line on stderr saying what failed.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from agent.backends.ebpf.programs import CFLAGS, PROGRAMS, SOURCE


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m agent.backends.ebpf.compile PIN_DIR STAGED", file=sys.stderr)
        return 2
    pin_dir, staged = Path(argv[0]), Path(argv[1])
    try:
        from bcc import BPF, libbcc
    except ImportError as exc:
        print(f"bcc is not importable ({exc}): apt-get install python3-bpfcc", file=sys.stderr)
        return 1
    text = SOURCE.read_text().replace("__PIN__", str(pin_dir))
    try:
        bpf = BPF(text=text, cflags=list(CFLAGS))
    except Exception as exc:  # bcc raises plain Exception
        print(f"compiling lb.c failed: {exc}", file=sys.stderr)
        return 1
    staged.mkdir(parents=True, exist_ok=True)
    for name, attach in PROGRAMS.items():
        try:
            fn = (bpf.load_func(name, BPF.SCHED_CLS) if attach is None
                  else bpf.load_func(name, BPF.CGROUP_SOCK_ADDR, attach_type=attach))
        except Exception as exc:
            print(f"loading program {name} failed: {exc}", file=sys.stderr)
            return 1
        if libbcc.lib.bpf_obj_pin(fn.fd, str(staged / name).encode()) != 0:
            print(f"cannot pin program {name} at {staged / name}: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
