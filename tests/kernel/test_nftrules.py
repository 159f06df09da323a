"""Reading iptables-nft's chains back over netlink (agent/kernel/nftrules.py, xtables.read_nft),
in a network namespace of this test's own: the same chains, rule counts and jumps as parsing
iptables-nft-save, both families; a chain's digest stays put while traffic moves its counters,
when the counters are zeroed and when someone commits elsewhere, and changes when a rule is
replaced in place (same count)."""

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
SCRIPT = r'''
import json, socket, subprocess
from agent.backends.iptables import chains as C
from agent.kernel.commands import run
from agent.kernel.xtables import Tools, parse_save, read_nft

tools = Tools("nft")
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
for fam, binary in ((4, "iptables-nft-restore"), (6, "ip6tables-nft-restore")):
    src = "10.9.9.9" if fam == 4 else "fd00::9"
    subprocess.run([binary, "--noflush"], check=True, text=True, input=(
        "*filter\n:KPA-T - [0:0]\n:KPA-EMPTY - [0:0]\n"
        "-A OUTPUT -p udp --dport 9 -m comment --comment kube-proxy-agent -j KPA-T\n"
        "-A KPA-T -p udp -m comment --comment \"default/web:dns\" -j ACCEPT\n"
        f"-A KPA-T -s {src} -j DROP\nCOMMIT\n"
        "*nat\n:KPA-SERVICES - [0:0]\n"
        "-A PREROUTING -m comment --comment kube-proxy-agent -j KPA-SERVICES\n"
        "-A KPA-SERVICES -d 10.96.0.0/12 -j RETURN\nCOMMIT\n" if fam == 4 else
        "*filter\n:KPA-T - [0:0]\n:KPA-EMPTY - [0:0]\n"
        "-A OUTPUT -p udp --dport 9 -m comment --comment kube-proxy-agent -j KPA-T\n"
        "-A KPA-T -p udp -m comment --comment \"default/web:dns\" -j ACCEPT\n"
        f"-A KPA-T -s {src} -j DROP\nCOMMIT\n"))

out = {}
def read(fam):
    s = read_nft(tools, fam, C.PREFIX, C.TABLES, [(t, b) for t, b, _, _ in C.HOOKS])
    return s

for fam in (4, 6):
    a = read(fam)
    b = parse_save(run(["iptables-nft-save" if fam == 4 else "ip6tables-nft-save"]), C.PREFIX)
    out[f"same{fam}"] = [
        {t: sorted(c) for t, c in a.chains.items() if c} == {t: sorted(c) for t, c in b.chains.items() if c},
        sorted(map(list, a.rules.items())) == sorted(map(list, b.rules.items())),
        {t: sorted(h) for t, h in a.hooks.items() if h} == {t: sorted(h) for t, h in b.hooks.items() if h},
    ]
    out[f"rules{fam}"] = sorted("/".join(k) + f"={n}" for k, n in a.rules.items())
    out[f"hooks{fam}"] = sorted(h for hs in a.hooks.values() for h in hs)

key = ("filter", "KPA-T")
d0 = read(4).digests[key]
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for _ in range(3):
        s.sendto(b"x", ("127.0.0.1", 9))
out["counted"] = [ln for ln in run(["iptables-nft-save", "-c", "-t", "filter"]).splitlines() if "dns" in ln]
out["after_traffic"] = read(4).digests[key] == d0
subprocess.run(["iptables-nft", "-Z", "KPA-T"], check=True)
out["after_zero"] = read(4).digests[key] == d0
subprocess.run(["nft", "add", "table", "ip", "someone-else"], check=True)
out["after_foreign_commit"] = read(4).digests[key] == d0
subprocess.run(["iptables-nft", "-R", "KPA-T", "2", "-s", "10.9.9.8", "-j", "DROP"], check=True)
after = read(4)
out["after_replace"] = [after.rules[key], after.digests[key] == d0]
subprocess.run(["iptables-nft", "-X", "KPA-EMPTY"], check=True)
out["after_delete_chain"] = sorted(read(4).chains["filter"])
print(json.dumps(out))
'''


@pytest.fixture
def netns() -> Iterator[str]:
    for tool in ("nft", "iptables-nft-restore"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (apt-get install nftables iptables)")
    with scratch_netns("kpa-nftrules") as name:
        works = subprocess.run(["ip", "netns", "exec", name, "nft", "add", "table", "ip", "kpa-probe"],
                               capture_output=True, text=True)
        if works.returncode != 0:  # e.g. inside the user-mode-linux guest of test_in_uml (kernel 6.1)
            pytest.skip(f"nf_tables does not work on this kernel: {works.stderr.strip()}")
        subprocess.run(["ip", "netns", "exec", name, "nft", "delete", "table", "ip", "kpa-probe"], check=True)
        yield name


def test_chains_read_over_netlink_match_iptables_save_and_digests_ignore_counters(netns: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", SCRIPT], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for fam in (4, 6):
        assert out[f"same{fam}"] == [True, True, True], out
    assert out["rules4"] == ["filter/KPA-EMPTY=0", "filter/KPA-T=2", "nat/KPA-SERVICES=1"], out
    assert out["rules6"] == ["filter/KPA-EMPTY=0", "filter/KPA-T=2"], out
    assert "-A PREROUTING -m comment --comment kube-proxy-agent -j KPA-SERVICES" in out["hooks4"], out
    assert any("[3:" in ln for ln in out["counted"]), out  # the traffic did move the counter
    assert out["after_traffic"] and out["after_zero"] and out["after_foreign_commit"], out
    assert out["after_replace"] == [2, False], out
    assert out["after_delete_chain"] == ["KPA-T"], out
