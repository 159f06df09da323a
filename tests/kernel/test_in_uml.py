"""The kernel suites of modes this machine's kernel cannot run, run inside a user-mode-linux guest
whose kernel can (IPVS: this kernel has none; the guest's 6.1 has it). The guest runs the same
tests (`pytest tests/kernel --proxy-mode MODE`) and this test reports its result, with the guest's
output when something failed."""

from __future__ import annotations

import os
import sys

import pytest

from tests.modes import why_unusable
from tests.uml import in_uml, run_in_uml, why_no_uml

UML_MODES = ("ipvs",)  # modes whose kernel support is proven in the UML guest
GUEST_TIMEOUT = 2400  # seconds for the guest's whole suite (about 5 minutes when the machine is idle)


@pytest.mark.timeout(GUEST_TIMEOUT + 60)  # the whole suite runs in this one test: several minutes
@pytest.mark.parametrize("uml_mode", UML_MODES)
def test_kernel_suite_inside_uml(uml_mode: str, request: pytest.FixtureRequest) -> None:
    if in_uml():
        pytest.skip("already inside the UML guest")
    chosen = request.config.getoption("--proxy-mode") or []
    if chosen and uml_mode not in chosen:
        pytest.skip(f"--proxy-mode {','.join(chosen)} given")
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root")
    if not why_unusable(uml_mode):
        pytest.skip(f"{uml_mode} runs on this kernel directly; the suite ran it there")
    why = why_no_uml()
    if why:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: cannot boot a UML guest for the {uml_mode} kernel suite: {why}")
        pytest.skip(f"cannot boot a UML guest for the {uml_mode} kernel suite: {why}")
    argv = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "tests/kernel",
            "--proxy-mode", uml_mode, "--timeout", "300"]
    rc, out = run_in_uml(argv, timeout=GUEST_TIMEOUT)
    print(out)
    assert rc == 0, f"{uml_mode} kernel suite inside UML failed (exit {rc}):\n{out[-6000:]}"
