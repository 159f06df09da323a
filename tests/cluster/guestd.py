"""A test node's insides, run in a user-mode-linux guest (whose kernel has IPVS): the node's
network (LAN, the apiserver link, the pod bridge), its proxy (kube-proxy-agent or upstream
kube-proxy), its pods' namespaces with echo servers, and probes on request.

Started as the guest's init command by tests/cluster/umlnode.py with a JSON config; it serves
JSON-lines requests on TCP (the apiserver link's address), one per connection:

    {"op": "pod_add", "name": ..., "ip": ..., "ports": [["tcp", 8080], ...]}   -> {"ok": true}
    {"op": "pod_del", "name": ...}
    {"op": "probe", "src": "<pod name>|node", "ip": ..., "port": ..., "proto": "tcp", "timeout": 1}
                                                                                -> {"reply": "..."}
    {"op": "exec", "argv": [...]}                                              -> {"out": "...", "rc": 0}
    {"op": "proxy", "action": "start|stop|kill", "argv": [...]}   (start: argv replaces the proxy, e.g. a takeover)
    {"op": "traffic", "action": "start", "targets": [[label, pod, ip, port, proto], ...], "rate": 20}
    {"op": "traffic", "action": "phase", "phase": "..."}
    {"op": "traffic", "action": "stop"}   -> {"table": "...", "failed": [...], "tried": n}
    {"op": "stats"}   -> {"cpu": <CPU s of the proxy's tree>, "rss": MB now, "peak": MB since it started}
    {"op": "await", "ip": ..., "port": ..., "name": "<pod>", "timeout": 30}
        -> {"elapsed": <s from this request to the first connection from the node answered by that pod> | null}
    {"op": "shutdown"}

The config's "start_proxy": false boots the guest with no proxy running (a benchmark's cold start).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.proctree import Watch, cpu_s
from tests.netlab import EchoServer, Lab, probe, recv_line, sh


class Node:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.lab = Lab(tag=cfg["name"][-4:])
        self.pods: dict[str, tuple[str, list[EchoServer]]] = {}  # name -> (netns, servers)
        self.proxy: subprocess.Popen[bytes] | None = None
        self.load: Any = None  # a tests.e2e.traffic.Traffic running
        self.watch: Watch | None = None  # the proxy's process tree RSS
        self.stop = threading.Event()

    def setup(self) -> None:
        c = self.cfg
        sh("ip", "link", "set", "vec0", "name", "eth0")
        sh("ip", "link", "set", "vec1", "name", "host0")
        for dev, cidr in (("eth0", f"{c['lan_ip']}/24"), ("host0", f"{c['host_ip']}/24")):
            sh("ip", "addr", "add", cidr, "dev", dev)
            sh("ip", "link", "set", dev, "up")
        sh("ip", "link", "add", "br0", "type", "bridge")
        sh("ip", "link", "set", "br0", "address", c["bridge_mac"])
        sh("ip", "link", "set", "br0", "up")
        sh("ip", "addr", "add", f"{c['gateway']}/24", "dev", "br0")
        sh("ip", "link", "add", "svc0", "type", "veth", "peer", "name", "svc1")
        sh("ip", "link", "set", "svc0", "up")
        sh("ip", "link", "set", "svc1", "up")
        sh("ip", "route", "add", c["service_cidr"], "dev", "svc0")
        for cidr, via in c["peers"]:
            sh("ip", "route", "add", cidr, "via", via)
        for s in ("net.ipv4.ip_forward=1", "net.ipv4.icmp_ratelimit=0"):
            sh("sysctl", "-qw", s)
        if c.get("legacy_iptables"):
            # upstream kube-proxy calls plain `iptables`, which here means iptables-nft, and this
            # kernel's nf_tables refuses every change: the legacy binary takes its place (guest only)
            for multi in ("/usr/sbin/xtables-nft-multi",):
                sh("mount", "--bind", "/usr/sbin/xtables-legacy-multi", multi)

    def start_proxy(self, argv: list[str] | None = None) -> None:
        log = open(self.cfg["proxy_log"], "ab")  # noqa: SIM115 (the proxy owns it)
        self.proxy = subprocess.Popen(argv or self.cfg["proxy_argv"], stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        if self.watch is not None:
            self.watch.stop()
        self.watch = Watch(self.proxy.pid)

    def stats(self) -> dict[str, Any]:
        assert self.proxy is not None and self.watch is not None, "no proxy started"
        return {"cpu": cpu_s(self.proxy.pid), "rss": self.watch.last, "peak": self.watch.peak}

    def await_answer(self, req: dict[str, Any]) -> dict[str, Any]:
        """Connections from the node itself, one started every 10 ms, until `name` answers."""
        import time

        from tests.cluster.harness import answered, first_success

        t0 = time.monotonic()
        try:
            t, _ = first_success(lambda: probe(None, req["ip"], int(req["port"]), "tcp", timeout=1.0),
                                 lambda r: answered(r) and r.split()[0] == req["name"],
                                 timeout=float(req.get("timeout", 30)))
        except TimeoutError:
            return {"elapsed": None}
        return {"elapsed": t - t0}

    def traffic(self, req: dict[str, Any]) -> dict[str, Any]:
        """New connections from pods to Services, counted as tests/e2e/traffic.py does, in here."""
        from tests.e2e.traffic import Traffic

        action = req["action"]
        if action == "start":
            targets = [(label, self.pods[pod][0], ip, int(port), proto)
                       for label, pod, ip, port, proto in req["targets"]]
            self.load = Traffic(targets, req.get("phase", "steady"), backend=req.get("backend", ""),
                                rate=float(req.get("rate", 20))).__enter__()
            return {"ok": True}
        assert self.load is not None, "no traffic started"
        if action == "phase":
            self.load.phase = req["phase"]
            return {"ok": True}
        self.load.__exit__()
        load, self.load = self.load, None
        return {"table": load.table(req.get("title", "in the guest")), "failed": load.failed,
                "tried": sum(load.tried.values()), "gap": max(load.gap.values(), default=0.0)}

    def pod_add(self, name: str, ip: str, ports: list[list[Any]]) -> None:
        ns = self.lab.ns(name)
        side = self.lab.link_name("vp")
        sh("ip", "link", "add", side, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", side, "master", "br0")
        sh("bridge", "link", "set", "dev", side, "hairpin", "on")
        sh("ip", "link", "set", side, "up")
        self.lab.exec(ns, "ip", "link", "set", "eth0", "up")
        self.lab.exec(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        self.lab.exec(ns, "ip", "route", "add", "default", "via", self.cfg["gateway"])
        servers = []
        for proto, port in ports:
            label = name if port == 8080 else f"{name}:{port}"
            servers.append(self.lab.serve(ns, label, [(proto, int(port))], v6=False))
        self.pods[name] = (ns, servers)

    def pod_del(self, name: str) -> None:
        ns, servers = self.pods.pop(name)
        for s in servers:
            s.close()
        self.lab.drop_ns(ns)

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "pod_add":
            self.pod_add(req["name"], req["ip"], req["ports"])
            return {"ok": True}
        if op == "pod_del":
            self.pod_del(req["name"])
            return {"ok": True}
        if op == "probe":
            ns = None if req["src"] == "node" else self.pods[req["src"]][0]
            return {"reply": probe(ns, req["ip"], int(req["port"]), req.get("proto", "tcp"),
                                   timeout=float(req.get("timeout", 1)), src_ip=req.get("src_ip", ""))}
        if op == "exec":
            proc = subprocess.run(req["argv"], capture_output=True, text=True, check=False)
            return {"out": proc.stdout + proc.stderr, "rc": proc.returncode}
        if op == "proxy":
            action = req["action"]
            if action in ("stop", "kill") and self.proxy is not None and self.proxy.poll() is None:
                self.proxy.send_signal(signal.SIGKILL if action == "kill" else signal.SIGTERM)
                self.proxy.wait(20)
            if action == "start":
                self.start_proxy(req.get("argv"))
            return {"ok": True}
        if op == "traffic":
            return self.traffic(req)
        if op == "stats":
            return self.stats()
        if op == "await":
            return self.await_answer(req)
        if op == "shutdown":
            self.stop.set()
            return {"ok": True}
        raise ValueError(f"unknown op {op}")

    def serve(self) -> None:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((self.cfg["host_ip"], int(self.cfg["port"])))
        srv.listen(64)
        srv.settimeout(0.5)
        Path(self.cfg["ready_file"]).write_text("ready\n")
        while not self.stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()
            self.proxy.wait(20)
        self.lab.close()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            data = recv_line(conn)
            if not data.endswith(b"\n"):
                return  # the caller went away mid-request
            try:
                out = self.handle(json.loads(data))
            except Exception as exc:  # reported to the caller
                out = {"error": f"{type(exc).__name__}: {exc}"}
            conn.sendall(json.dumps(out).encode() + b"\n")


def main() -> int:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    node = Node(cfg)
    node.setup()
    if cfg.get("start_proxy", True):
        node.start_proxy()
    node.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
