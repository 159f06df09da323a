"""A mode this machine cannot run exits at once, naming what is missing and which mode works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.backends import registry
from agent.backends.base import UnsupportedMode

AGENT = str(Path(sys.executable).parent / "kube-proxy-agent")


@pytest.mark.parametrize("mode", registry.MODES)
def test_unusable_mode_exits_at_once_with_the_reason(mode: str, tmp_path: Path) -> None:
    try:
        registry.make_backend(mode, (4,)).check_supported()
        pytest.skip(f"{mode} runs on this machine")
    except UnsupportedMode:
        pass
    (tmp_path / "empty.yaml").write_text("")
    proc = subprocess.run([AGENT, "--proxy-mode", mode, "--source", str(tmp_path)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1
    assert f"--proxy-mode {mode}" in proc.stderr
    assert "--proxy-mode nftables" in proc.stderr  # what would work instead


def test_bad_flag_value_names_the_flag() -> None:
    proc = subprocess.run([AGENT, "--cluster-cidr", "10.244.0.0", "--once", "--source", "/nonexistent"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "--cluster-cidr" in proc.stderr and "not a CIDR" in proc.stderr
