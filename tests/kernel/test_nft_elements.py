"""The nftables mode's endpoint changes written over netlink (agent/kernel/nftelements.py) into a
real table, in a network namespace of this test's own: the kernel holds what nft text would have
written (read back with `nft get element`), both families; an element someone deleted by hand
makes the netlink write fail as a whole, the same changes then go through nft (which names the
statement), and the full sync that follows repairs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netlab import scratch_netns

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = r'''
import logging, subprocess, sys
from agent.backends.base import SyncError
from agent.backends.nftables import names as N
from agent.backends.nftables.writer import NftablesBackend
from agent.model.desired import Changes, DesiredState, NodeContext, ServicePlan
from agent.model.endpoints import EndpointInfo
from agent.model.serviceport import ServicePortInfo, ServicePortName

logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
nodes = {4: NodeContext(family=4, node_name="n", cluster_cidrs=("10.244.0.0/16",)),
         6: NodeContext(family=6, node_name="n", cluster_cidrs=("fd00:244::/64",))}
cip = {4: "10.96.0.10", 6: "fd00:96::10"}
pods = {4: ["10.244.1.2", "10.244.1.3", "10.244.1.4"], 6: ["fd00:244::2", "fd00:244::3", "fd00:244::4"]}

def desired(pick):
    out = {}
    for fam in (4, 6):
        name = ServicePortName("default", "web", "http", "TCP")
        eps = tuple(EndpointInfo(pods[fam][i], 8080, node_name="n") for i in pick)
        plan = ServicePlan(ServicePortInfo(name, fam, "TCP", 80, cip[fam]), eps, has_any=True)
        st = DesiredState(nodes[fam])
        st.services[name] = plan
        out[fam] = st
    return out

def listed(fam, mapname):
    t = "ip" if fam == 4 else "ip6"
    return subprocess.run(["nft", "list", "map" if mapname != "hairpin" else "set", t, N.TABLE, mapname],
                          capture_output=True, text=True).stdout

b = NftablesBackend(families=(4, 6))
b.check_supported()
def changes(d):
    return {f: Changes(ports=frozenset(d[f].services)) for f in d}

d = desired([0, 1])
b.sync(d, changes(d), full=True)
emap = N.endpoint_map(N.service_chain("svc", "default/web:http", "TCP"))
d = desired([0, 2])
r = b.sync(d, changes(d), full=False)
print("detail", r.detail)
for fam in (4, 6):
    print("map", fam, " ".join(listed(fam, emap).split()))
    print("hairpin", fam, " ".join(listed(fam, "hairpin").split()))
# an element deleted by hand: the next swap's netlink delete is refused, nft text is too
subprocess.run(["nft", "delete", "element", "ip", N.TABLE, emap, "{", "1", "}"], check=True)
d = desired([0, 1])
try:
    b.sync(d, changes(d), full=False)
    print("no error")
except SyncError as exc:
    print("error", exc)
r = b.sync(d, changes(d), full=True)
print("after full", r.detail)
print("map", 4, " ".join(listed(4, emap).split()))
b.cleanup()
'''


@pytest.fixture
def netns() -> Iterator[str]:
    if shutil.which("nft") is None:
        pytest.skip("the nft tool is missing (apt-get install nftables)")
    with scratch_netns("kpa-nftel") as name:
        works = subprocess.run(["ip", "netns", "exec", name, "nft", "add", "table", "ip", "kpa-probe"],
                               capture_output=True, text=True)
        if works.returncode != 0:  # e.g. inside the user-mode-linux guest of test_in_uml (kernel 6.1)
            pytest.skip(f"nf_tables does not work on this kernel: {works.stderr.strip()}")
        yield name


def test_endpoint_swaps_go_over_netlink_and_a_refused_one_falls_back_to_nft(netns: str) -> None:
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", SCRIPT], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert "detail IPv4=partial IPv6=partial writer=netlink" in lines, out
    v4 = next(ln for ln in lines if ln.startswith("map 4 "))
    assert "0 : 10.244.1.2" in v4 and "1 : 10.244.1.4" in v4 and "10.244.1.3" not in v4, out
    v6 = next(ln for ln in lines if ln.startswith("map 6 "))
    assert "0 : fd00:244::2" in v6 and "1 : fd00:244::4" in v6 and "fd00:244::3" not in v6, out
    h4 = next(ln for ln in lines if ln.startswith("hairpin 4 "))
    assert "10.244.1.4 . 10.244.1.4" in h4 and "10.244.1.3 . 10.244.1.3" not in h4, out
    assert any(ln.startswith("WARNING nftables element write over netlink failed") and "No such file" in ln
               for ln in lines), out
    err = next(ln for ln in lines if ln.startswith("error "))
    assert "nft transaction failed" in err and "delete element" in err, out
    assert "after full IPv4=full IPv6=full" in lines, out
    v4 = [ln for ln in lines if ln.startswith("map 4 ")][-1]
    assert "0 : 10.244.1.2" in v4 and "1 : 10.244.1.3" in v4, out
