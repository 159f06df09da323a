"""End-to-end fixtures: one real control plane per session, one pair of nodes per proxy mode, one
Kubernetes namespace per test. See tests/cluster/harness.py for the world they build.

    pytest tests/e2e                          # every mode this machine supports
    pytest tests/e2e --e2e-mode iptables      # one mode (also: KPA_E2E_MODES=iptables pytest ...)

Without the control plane binaries (and outside CI) the tests are skipped with the reason; with
CI=true they fail instead.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from agent.backends import registry
from agent.backends.base import UnsupportedMode
from agent.backends.registry import make_backend
from tests.cluster.controlplane import ControlPlaneUnavailable, find_bins
from tests.cluster.harness import Harness, summarize
from tests.e2e.support import Cluster, Kit, build_cluster, slug, teardown_cluster
from tests.modes import NOT_RUN, runnable

MODES = registry.MODES  # every mode; one this machine cannot run is skipped with the reason
HARNESS_LOG: list[str] = []
SKIPPED: dict[str, str] = {}  # what -> why (printed in the summary, never silent)
REPORTS: list[str] = []  # tables added by tests (the side-by-side comparison)
_state: dict[str, Any] = {}
_seq = itertools.count(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    # Not --proxy-mode: tests/kernel/conftest.py registers that one unguarded, and both conftests
    # are loaded by `pytest tests`. Its value is honoured when it is there, though.
    parser.addoption("--e2e-mode", action="append", default=[], help="run e2e tests for this proxy mode only")


def _modes(config: pytest.Config) -> list[str]:
    chosen: list[str] = list(config.getoption("--e2e-mode", default=[]) or [])
    chosen = chosen or list(config.getoption("--proxy-mode", default=[]) or [])
    if not chosen and os.environ.get("KPA_E2E_MODES"):
        chosen = [m.strip() for m in os.environ["KPA_E2E_MODES"].split(",") if m.strip()]
    return runnable(m for m in (chosen or list(MODES)) if m in MODES)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mode" in metafunc.fixturenames:
        metafunc.parametrize("mode", _modes(metafunc.config), scope="session")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.e2e)


def mode_unsupported(mode: str) -> str:
    try:
        make_backend(mode).check_supported()
    except (UnsupportedMode, ImportError, OSError) as exc:
        return str(exc) or type(exc).__name__
    return ""


def conntrack_table(netns: str, lines: int = 40) -> str:
    """The node's conntrack entries (newest last, at most `lines`): a failed connection shows
    whether it was NATed, and to where."""
    try:
        out = subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-L"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"conntrack -L failed: {exc}"
    rows = out.stdout.splitlines()
    return "\n".join([*rows[-lines:], f"({len(rows)} entries) {out.stderr.strip()}"])


def _log(msg: str) -> None:
    HARNESS_LOG.append(msg)


@pytest.fixture(scope="session")
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    if "error" in _state:
        pytest.skip(_state["error"])
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    why = ""
    if os.geteuid() != 0:
        why = "e2e tests need root (network namespaces, iptables, nftables)"
    else:
        try:
            bins = find_bins()
        except ControlPlaneUnavailable as exc:
            why = f"no control plane: {exc}"
    if why:
        SKIPPED["e2e (control plane)"] = ("FAILED, CI=true: " if ci else "") + why
        if ci:
            pytest.fail(f"CI=true: {why}", pytrace=False)
        _state["error"] = why
        pytest.skip(why)
    h = Harness(log=_log, bins=bins)
    request.addfinalizer(h.close)  # before start(): a half-started harness is torn down too
    try:
        h.start()
    except Exception as exc:
        _state["error"] = f"control plane failed to start: {exc}"
        raise
    _state["harness"] = h
    yield h


@pytest.fixture(scope="session")
def cluster(harness: Harness, mode: str) -> Iterator[Cluster]:
    why = mode_unsupported(mode)
    if why:
        SKIPPED[f"e2e {mode}"] = why
        pytest.skip(f"{mode} mode not usable here: {why}")
    c = build_cluster(harness, mode, prefix=mode[:3])
    harness.controller_canary()
    harness.say(f"{mode}: nodes {', '.join(n.name for n in c.nodes)} ready")
    try:
        yield c
    finally:
        teardown_cluster(c)


@pytest.fixture
def k(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Kit]:
    name = f"{cluster.mode[:3]}-{next(_seq)}-{slug(request.node.originalname.removeprefix('test_'), 40)}"
    cluster.h.namespace(name)
    kit = Kit(cluster, name, request.node.originalname.removeprefix("test_"))
    yield kit
    cluster.h.cleanup_namespace(name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    outcome: Any = yield
    rep = outcome.get_result()
    h: Harness | None = _state.get("harness")
    if rep.failed and h is not None and "tests/e2e/" in str(item.fspath).replace(os.sep, "/"):
        for node in list(h.nodes.values()):
            if node.proxy is not None:
                rep.sections.append((f"{node.proxy_kind} on {node.name} (log tail)", node.proxy.tail(30)))
                rep.sections.append((f"conntrack on {node.name} (at the failure)", conntrack_table(node.netns)))
                if node.bpffs:
                    from tests.netlab import ebpf_maps

                    rep.sections.append((f"eBPF maps on {node.name} (at the failure)",
                                         ebpf_maps(f"{node.bpffs}/kube-proxy-agent/v1")))
        if h.cp is not None and h.cp.kcm is not None:
            rep.sections.append(("kube-controller-manager (log tail)", h.cp.kcm.tail(15)))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    tr = terminalreporter
    h: Harness | None = _state.get("harness")
    for mode, why in NOT_RUN.items():
        SKIPPED.setdefault(f"e2e {mode}", why)
    if not (HARNESS_LOG or SKIPPED or REPORTS or h):
        return
    tr.section("kube-proxy-agent e2e")
    for what, why in SKIPPED.items():
        tr.write_line(f"{'' if why.startswith('FAILED') else 'SKIPPED '}{what}: {why}")
    for line in HARNESS_LOG:
        tr.write_line(line)
    if h is not None and h.latencies:
        tr.write_line("")
        tr.write_line("network programming latency (API change accepted -> first successful connection):")
        verbose = tr.config.getoption("verbose", 0) > 0
        for line in summarize(h.latencies, slowest=len(h.latencies) if verbose else 3):
            tr.write_line("  " + line)
    for table in REPORTS:
        tr.write_line("")
        for line in table.splitlines():
            tr.write_line(line)
