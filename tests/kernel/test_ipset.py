"""ipset entries added and deleted over netlink (agent/kernel/ipset.py `change`), in a network
namespace of this test's own, checked with `ipset save`: every set type the IPVS mode uses, both
families, -exist semantics, and the error naming the refused line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netlab import scratch_netns

ROOT = Path(__file__).resolve().parents[2]
SETS = ["create T1 hash:ip,port -exist", "create T2 hash:ip,port,ip -exist", "create T3 hash:ip,port,net -exist",
        "create T4 hash:ip -exist", "create T6 hash:ip,port family inet6 -exist",
        "create T7 hash:ip,port,net family inet6 -exist"]
CHANGE = """
import json, sys
from agent.kernel import ipset
try:
    ipset.change(json.loads(sys.argv[1]))
except ipset.IpsetError as exc:
    print(exc)
"""


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    if shutil.which("ipset") is None:
        pytest.skip("the ipset tool is missing (apt-get install ipset)")
    with scratch_netns("kpa-ipset") as name:
        subprocess.run(["ip", "netns", "exec", name, "ipset", "restore"], input="\n".join(SETS) + "\n",
                       text=True, check=True)
        yield name


def change(netns: str, lines: list[str]) -> str:
    """ipset.change(lines) in the namespace; what it raised, or ""."""
    done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", CHANGE, json.dumps(lines)],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def entries(netns: str) -> set[str]:
    out = subprocess.run(["ip", "netns", "exec", netns, "ipset", "save"], capture_output=True, text=True,
                         check=True).stdout
    return {line.removeprefix("add ") for line in out.splitlines() if line.startswith("add ")}


def test_entries_of_every_set_type_added_and_deleted_over_netlink(netns: str) -> None:
    adds = ["add T1 10.96.0.1,tcp:80", "add T1 10.96.0.2,udp:53", "add T1 10.96.0.3,sctp:9000",
            "add T2 10.244.1.2,tcp:8080,10.244.1.2", "add T3 1.2.3.4,tcp:80,10.0.0.0/8",
            "add T3 1.2.3.4,tcp:81,10.0.0.1", "add T4 10.96.0.9", "add T6 fd00::1,tcp:80",
            "add T7 fd00::1,tcp:80,fd00:1::/64",
            "add T1 10.96.0.1,tcp:80"]  # there already: no error (-exist)
    assert change(netns, adds) == ""
    assert entries(netns) == {a.removeprefix("add ") for a in adds}
    # deleting what is not there is no error either
    assert change(netns, ["del T1 10.96.0.2,udp:53", "del T1 10.96.0.99,udp:53", "del T4 10.96.0.9"]) == ""
    assert "T1 10.96.0.2,udp:53" not in entries(netns) and "T4 10.96.0.9" not in entries(netns)
    assert "T1 10.96.0.3,sctp:9000" in entries(netns)


def test_a_refused_change_is_named_and_the_others_take_effect(netns: str) -> None:
    said = change(netns, ["add NOPE 10.96.0.1,tcp:80", "add T1 10.96.0.5,tcp:1"])
    assert said.startswith("ipset refused 1 of 2 change(s), first: add NOPE 10.96.0.1,tcp:80: ")
    assert "T1 10.96.0.5,tcp:1" in entries(netns)
    said = change(netns, ["add T4 10.96.0.1,tcp:80"])  # a port in a hash:ip set
    assert said == "ipset refused 1 of 1 change(s), first: add T4 10.96.0.1,tcp:80: protocol error"
