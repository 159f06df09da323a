"""Running host commands: one place that knows how to call a binary and report its failure."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence


class CommandError(RuntimeError):
    def __init__(self, argv: Sequence[str], code: int, stderr: str) -> None:
        self.argv = list(argv)
        self.code = code
        self.stderr = stderr.strip()
        super().__init__(f"{' '.join(argv)} exited {code}: {self.stderr}")


def run(argv: Sequence[str], stdin: str | None = None, check: bool = True, timeout: float = 120) -> str:
    """Run a command, return its stdout; raise CommandError (with stderr) when it fails or does not
    finish within `timeout` seconds (killed; exit code -1)."""
    try:
        proc = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise CommandError(argv, -1, f"did not finish within {timeout:g} s; killed") from None
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr)
    return proc.stdout


def have(binary: str) -> bool:
    return shutil.which(binary) is not None
