"""What one nftables transaction costs against a big table, by kind of statement: the floor under
the nftables mode's change latency. Builds N Services x 10 endpoints with the mode's own full sync
in a fresh network namespace, then times (median of 10) transactions that differ in one thing.

    ip netns add kpa-floor && ip netns exec kpa-floor .venv/bin/python -m tests.bench.nft_floor 10000

Seen at 10k on the 2-core development machine (2026-12-02): `add table` 0.1 ms; a hairpin set
element 27 ms; a chain with a counter rule 22 ms (libnftables fetching the table's chains and sets);
the same chain with a `dnat` or `jump` rule 112-115 ms (the kernel revalidates every rule of the
table when a commit adds a rule that has to be validated). The last line is the endpoint map
element added and deleted over netlink, as the mode writes endpoint-only changes."""

from __future__ import annotations

import statistics
import sys
import time

from agent.backends.nftables.elements import element_writes
from agent.backends.nftables.writer import NftablesBackend
from agent.kernel import nftelements
from agent.model.records import EndpointSlice, Service, from_builtins
from agent.model.serviceport import NamespacedName
from agent.model.state import ClusterModel
from tests.bench.bench import eslice, service

T = "ip kube-proxy-agent"
CASES = (
    ("add table (no cache fetch)", f"add table {T}\n"),
    ("hairpin set element", f"add element {T} hairpin {{ 10.9.9.9 . 10.9.9.9 }}\n"
                            f"delete element {T} hairpin {{ 10.9.9.9 . 10.9.9.9 }}\n"),
    ("endpoint map element", f"add element {T} endpoints-00 {{ 4000000000 : 10.9.9.9 }}\n"
                             f"delete element {T} endpoints-00 {{ 4000000000 }}\n"),
    ("chain with a counter rule", f"add chain {T} zz\nflush chain {T} zz\nadd rule {T} zz counter\n"),
    ("chain with a dnat rule", f"add chain {T} zz\nflush chain {T} zz\n"
                               f"add rule {T} zz meta l4proto tcp dnat to 10.1.1.1:80\n"),
    ("chain with a jump rule", f"add chain {T} zz\nflush chain {T} zz\nadd rule {T} zz jump mark-for-masquerade\n"),
)


def main(argv: list[str]) -> int:
    size = int(argv[0]) if argv else 10_000
    model = ClusterModel("node0", ["10.128.0.0/9"])
    for i in range(size):
        svc = from_builtins("Service", service(i))
        eps = from_builtins("EndpointSlice", eslice(i))
        assert isinstance(svc, Service) and isinstance(eps, EndpointSlice)
        model.on_service(NamespacedName("bench", f"svc-{i}"), svc)
        model.on_slice(NamespacedName("bench", f"svc-{i}-abc"), eps)
    update = model.drain()
    backend = NftablesBackend(families=(4,))
    backend.check_supported()
    backend.sync(model.desired, {4: update.changes(4)}, full=True)
    nft = backend.nft
    assert nft is not None
    print(f"{size} Services x 10 endpoints, one transaction each, median of 10:")
    try:
        for label, text in CASES:
            took = []
            for _ in range(10):
                t0 = time.perf_counter()
                rc, _, err = nft.run(text)
                took.append(time.perf_counter() - t0)
                if rc != 0:
                    raise SystemExit(f"{label}: nft refused it: {err}")
            print(f"  {label:30} {statistics.median(took) * 1000:8.1f} ms")
        # the same endpoint map element as one netlink batch, as the mode writes endpoint-only changes
        took = []
        for _ in range(10):
            t0 = time.perf_counter()
            nftelements.commit(element_writes(4, [(True, "endpoints-00", "4000000000", "10.9.9.9"),
                                                  (False, "endpoints-00", "4000000000", "")]))
            took.append(time.perf_counter() - t0)
        print(f"  {'endpoint map element, netlink':30} {statistics.median(took) * 1000:8.1f} ms")
    finally:
        backend.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
