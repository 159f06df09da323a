"""kube-proxy's health semantics (/healthz, /livez, healthCheckNodePort servers) and configuration
(flag parsing helpers, the KubeProxyConfiguration subset, flag-over-file precedence)."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import cli
from agent.config import (
    AgentConfig,
    ConfigError,
    from_config_file,
    parse_bind,
    parse_cidrs,
    parse_duration,
    parse_nodeport_addresses,
    validate,
)
from agent.files import FileError
from agent.health import HealthCheckService, ProxyHealth, ServiceHealthServers, health_responder

# -- ProxyHealth -----------------------------------------------------------------------------

START = 1_700_000_000.0  # a wall-clock time; never 0, which ProxyHealth reads as "nothing queued"


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def health(timeout: float = 60.0) -> tuple[ProxyHealth, FakeClock]:
    clock = FakeClock()
    return ProxyHealth(timeout, clock=clock), clock


def test_healthy_at_start() -> None:
    """Before any sync and with nothing queued, kube-proxy reports healthy."""
    h, _ = health()
    ok, body = h.status(check_node=True)
    assert ok
    assert body == {"lastUpdated": "", "currentTime": "2023-11-14T22:13:20.000000Z", "nodeEligible": True}


@pytest.mark.parametrize(
    ("age", "healthy"),
    [
        pytest.param(0.0, True, id="just-queued"),
        pytest.param(59.0, True, id="younger-than-timeout"),
        pytest.param(60.0, True, id="exactly-timeout"),
        pytest.param(60.5, False, id="older-than-timeout"),
    ],
)
def test_queued_update_waiting_too_long_is_unhealthy(age: float, healthy: bool) -> None:
    """An update queued and not synced within the timeout (2 x syncPeriod) makes /healthz fail."""
    h, clock = health(timeout=60.0)
    h.queued()
    clock.now += age
    assert h.status(check_node=True)[0] is healthy
    assert h.status(check_node=False)[0] is healthy


def test_the_oldest_queued_update_counts() -> None:
    h, clock = health(timeout=60.0)
    h.queued()
    clock.now += 50
    h.queued()  # a later change does not reset the wait
    clock.now += 20
    assert not h.status(check_node=True)[0]


def test_a_sync_makes_it_healthy_again() -> None:
    h, clock = health(timeout=60.0)
    h.queued()
    clock.now += 120
    assert not h.status(check_node=True)[0]
    h.updated()
    ok, body = h.status(check_node=True)
    assert ok
    assert body["lastUpdated"] == "2023-11-14T22:15:20.000000Z"
    clock.now += 1000  # nothing queued since: healthy however long ago the last sync was
    assert h.status(check_node=True)[0]


def test_node_being_deleted_fails_healthz_but_not_livez() -> None:
    """A node with a deletionTimestamp: /healthz says not eligible (load balancers drain it), /livez
    stays healthy (the agent itself is fine, so it must not be restarted)."""
    h, _ = health()
    h.node_deleting = True
    ok, body = h.status(check_node=True)
    assert not ok
    assert body["nodeEligible"] is False
    ok, body = h.status(check_node=False)
    assert ok
    assert "nodeEligible" not in body


@pytest.mark.parametrize(
    ("path", "deleting", "code"),
    [
        pytest.param("/healthz", False, 200, id="healthz"),
        pytest.param("/healthz?verbose=1", False, 200, id="healthz-with-query"),
        pytest.param("/livez", False, 200, id="livez"),
        pytest.param("/healthz", True, 503, id="healthz-node-deleting"),
        pytest.param("/livez", True, 200, id="livez-node-deleting"),
        pytest.param("/metrics", False, 404, id="other-path"),
    ],
)
def test_health_responder(path: str, deleting: bool, code: int) -> None:
    h, _ = health()
    h.node_deleting = deleting
    seen: list[tuple[str, int]] = []
    got, body, _ = health_responder(h, lambda p, c: seen.append((p, c)))(path)
    assert got == code
    assert isinstance(json.loads(body), dict)
    assert seen == ([] if code == 404 else [(path.split("?")[0], code)])


# -- ServiceHealthServers --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(port: int, path: str = "/") -> tuple[int, dict[str, Any], dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), dict(resp.getheaders())
    finally:
        conn.close()


@pytest.fixture
def servers() -> Iterator[ServiceHealthServers]:
    hc = ServiceHealthServers(bind_ip="127.0.0.1")
    yield hc
    hc.close()


def test_health_check_node_port_reports_local_endpoints(servers: ServiceHealthServers) -> None:
    """externalTrafficPolicy Local: the load balancer asks each node on the healthCheckNodePort. A node
    with local endpoints answers 200 with their count; without one, 503, so the load balancer sends
    it no traffic. The same server follows the count as it changes."""
    port = free_port()
    servers.update({port: HealthCheckService("shop", "web", port, 2)})
    code, body, headers = get(port)
    assert code == 200
    assert body == {"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 2,
                    "serviceProxyHealthy": True}
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "2"
    assert headers["Content-Type"] == "application/json"

    servers.update({port: HealthCheckService("shop", "web", port, 0)})
    code, body, headers = get(port)
    assert (code, body["localEndpoints"], headers["X-Load-Balancing-Endpoint-Weight"]) == (503, 0, "0")

    servers.update({port: HealthCheckService("shop", "web", port, 1)})
    assert get(port)[0] == 200


def test_health_check_server_stops_when_its_service_goes(servers: ServiceHealthServers) -> None:
    """The Service is deleted (or its policy goes back to Cluster): its port is closed."""
    port = free_port()
    servers.update({port: HealthCheckService("shop", "web", port, 1)})
    assert get(port)[0] == 200
    servers.update({})
    with pytest.raises(ConnectionRefusedError):
        get(port)


def test_health_check_port_in_use_is_logged_not_raised(servers: ServiceHealthServers,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        servers.update({port: HealthCheckService("shop", "web", port, 1)})
    assert "could not listen" in caplog.text


# -- config helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0), ("1m0s", 60.0), ("500ms", 0.5), ("1h", 3600.0), ("1h30m", 5400.0), ("1.5s", 1.5),
        ("0", 0.0), ("0s", 0.0), (" 2m ", 120.0), (15, 15.0), (0.25, 0.25),
    ],
)
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    """Go durations as kube-proxy flags and KubeProxyConfiguration take them."""
    assert parse_duration(text, "--sync-period") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["30", "abc", "", "  ", "1x", "-1s", "1s garbage", "s", "1m-1s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--sync-period"):
        parse_duration(text, "--sync-period")


@pytest.mark.parametrize(
    ("text", "cidrs"),
    [
        ("10.244.0.0/16", ("10.244.0.0/16",)),
        ("10.244.0.0/16,fd00:244::/48", ("10.244.0.0/16", "fd00:244::/48")),
        (" 10.244.1.7/16 , ", ("10.244.0.0/16",)),  # host bits dropped, blanks ignored
        ("", ()),
    ],
)
def test_parse_cidrs(text: str | list[str], cidrs: tuple[str, ...]) -> None:
    assert parse_cidrs(text, "--cluster-cidr") == cidrs


def test_nodeport_addresses_take_primary_alone() -> None:
    """As kube-proxy: CIDRs, or the single word "primary" (the node's primary IPs), never both."""
    assert parse_nodeport_addresses("primary", "--nodeport-addresses") == ("primary",)
    assert parse_nodeport_addresses(["primary"], "nodePortAddresses") == ("primary",)
    assert parse_nodeport_addresses("10.0.0.0/8", "--nodeport-addresses") == ("10.0.0.0/8",)
    with pytest.raises(ConfigError, match="'primary' cannot be combined with CIDRs"):
        parse_nodeport_addresses(["192.168.0.0/16", "primary"], "nodePortAddresses")


def test_parse_cidrs_rejects() -> None:
    with pytest.raises(ConfigError, match=r"--cluster-cidr: '10\.244\.0\.0/33' is not a CIDR"):
        parse_cidrs("10.0.0.0/8,10.244.0.0/33", "--cluster-cidr")


@pytest.mark.parametrize(
    ("text", "bind"),
    [
        ("0.0.0.0:10256", ("0.0.0.0", 10256)),
        ("127.0.0.1:10249", ("127.0.0.1", 10249)),
        ("[::]:10256", ("::", 10256)),
        ("[::1]:10249", ("::1", 10249)),
        (":10256", ("0.0.0.0", 10256)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),  # port 0: the server is not started
    ],
)
def test_parse_bind(text: str, bind: tuple[str, int]) -> None:
    assert parse_bind(text, "--healthz-bind-address") == bind


@pytest.mark.parametrize("text", ["10256", "0.0.0.0", "0.0.0.0:http", "0.0.0.0:65536", "0.0.0.0:-1", ""])
def test_parse_bind_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--healthz-bind-address"):
        parse_bind(text, "--healthz-bind-address")


KUBE_PROXY_CONFIG = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clusterCIDR: 10.244.0.0/16,fd00:244::/48
hostnameOverride: node-a
metricsBindAddress: 0.0.0.0:10249
healthzBindAddress: 0.0.0.0:10256
nodePortAddresses: [192.168.0.0/16]
clientConnection:
  kubeconfig: /etc/kubernetes/kube-proxy.conf
  qps: 5
conntrack:
  maxPerCore: 32768
iptables:
  masqueradeAll: true
  syncPeriod: 1m0s
  minSyncPeriod: 500ms
"""


def test_from_config_file_reads_the_kube_proxy_configuration_subset() -> None:
    """A kubeadm-style KubeProxyConfiguration: what the agent reads, with syncPeriod and masqueradeAll
    under iptables as in v1alpha1; the rest (conntrack, qps ...) is ignored."""
    assert from_config_file(yaml.safe_load(KUBE_PROXY_CONFIG)) == {
        "proxy_mode": "nftables",
        "cluster_cidrs": ("10.244.0.0/16", "fd00:244::/48"),
        "hostname_override": "node-a",
        "metrics_bind_address": "0.0.0.0:10249",
        "healthz_bind_address": "0.0.0.0:10256",
        "nodeport_addresses": ("192.168.0.0/16",),
        "masquerade_all": True,
        "sync_period": 60.0,
        "min_sync_period": 0.5,
        "kubeconfig": "/etc/kubernetes/kube-proxy.conf",
    }


@pytest.mark.parametrize(
    ("doc", "values"),
    [
        pytest.param({}, {}, id="empty"),
        pytest.param({"kind": "KubeProxyConfiguration", "iptables": {"masqueradeAll": False}},
                     {"masquerade_all": False}, id="masqueradeAll-false"),
        pytest.param({"syncPeriod": "45s"}, {"sync_period": 45.0}, id="top-level-syncPeriod"),
        pytest.param({"nftables": {"syncPeriod": "10s", "minSyncPeriod": "2s"}},
                     {"sync_period": 10.0, "min_sync_period": 2.0}, id="nftables-section"),
        pytest.param({"mode": "", "clusterCIDR": ""}, {}, id="empty-values-mean-default"),
    ],
)
def test_from_config_file_variants(doc: dict[str, Any], values: dict[str, Any]) -> None:
    assert from_config_file(doc) == values


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"kind": "KubeletConfiguration"}, "expected KubeProxyConfiguration"),
        ({"iptables": {"syncPeriod": "often"}}, "syncPeriod"),
        ({"clusterCIDR": "pods"}, "clusterCIDR"),
        ({"nodePortAddresses": ["192.168.0.0/16", "eth0"]}, "nodePortAddresses"),
    ],
)
def test_from_config_file_errors(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_config_file(doc)


def test_a_bare_address_is_not_a_cidr() -> None:
    with pytest.raises(ConfigError, match="--cluster-cidr"):
        parse_cidrs("10.244.0.0", "--cluster-cidr")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"proxy_mode": "userspace"}, "--proxy-mode 'userspace' is not one of"),
        ({"metrics_bind_address": "localhost"}, "--metrics-bind-address"),
        ({"healthz_bind_address": "0.0.0.0:99999"}, "--healthz-bind-address"),
        ({"sync_period": 0.0}, "--sync-period must be positive"),
        ({"min_sync_period": -1.0}, "--min-sync-period"),
        ({"sync_period": 10.0, "min_sync_period": 20.0}, "--min-sync-period"),
    ],
)
def test_validate_errors(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(AgentConfig(**changes))


def test_defaults_are_kube_proxys_and_valid() -> None:
    cfg = AgentConfig()
    validate(cfg)
    assert (cfg.proxy_mode, cfg.sync_period, cfg.min_sync_period) == ("iptables", 30.0, 1.0)
    assert (cfg.metrics_bind_address, cfg.healthz_bind_address) == ("127.0.0.1:10249", "0.0.0.0:10256")


# -- cli.build_config ------------------------------------------------------------------------


def build(*argv: str) -> AgentConfig:
    return cli.build_config(cli._parser().parse_args(list(argv)))


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "kube-proxy.yaml"
    path.write_text(KUBE_PROXY_CONFIG)
    return path


def test_flags_only() -> None:
    cfg = build("--hostname-override", "node-b", "--proxy-mode", "nftables", "--cluster-cidr", "10.244.0.0/16",
                "--masquerade-all", "--sync-period", "10s", "--min-sync-period", "0s", "--nodeport-addresses",
                "192.168.0.0/16", "--source", "/srv/objects", "--once", "-v", "4")
    assert cfg == AgentConfig(proxy_mode="nftables", hostname_override="node-b", cluster_cidrs=("10.244.0.0/16",),
                              masquerade_all=True, sync_period=10.0, min_sync_period=0.0,
                              nodeport_addresses=("192.168.0.0/16",), source="/srv/objects", once=True, verbosity=4)


def test_config_file_only(config_file: Path) -> None:
    cfg = build("--config", str(config_file))
    assert cfg == AgentConfig(
        proxy_mode="nftables", kubeconfig="/etc/kubernetes/kube-proxy.conf", hostname_override="node-a",
        cluster_cidrs=("10.244.0.0/16", "fd00:244::/48"), masquerade_all=True,
        nodeport_addresses=("192.168.0.0/16",), metrics_bind_address="0.0.0.0:10249",
        healthz_bind_address="0.0.0.0:10256", sync_period=60.0, min_sync_period=0.5,
    )


def test_explicit_flags_win_over_the_config_file(config_file: Path) -> None:
    """Flags given on the command line override the file; what the flags leave out comes from the file."""
    cfg = build("--config", str(config_file), "--proxy-mode", "iptables", "--sync-period", "20s",
                "--cluster-cidr", "10.250.0.0/16", "--hostname-override", "node-z",
                "--healthz-bind-address", "127.0.0.1:10256")
    assert cfg.proxy_mode == "iptables"
    assert cfg.sync_period == 20.0
    assert cfg.cluster_cidrs == ("10.250.0.0/16",)
    assert cfg.hostname_override == "node-z"
    assert cfg.healthz_bind_address == "127.0.0.1:10256"
    # not given as flags: from the file
    assert cfg.masquerade_all is True
    assert cfg.min_sync_period == 0.5
    assert cfg.nodeport_addresses == ("192.168.0.0/16",)
    assert cfg.kubeconfig == "/etc/kubernetes/kube-proxy.conf"


def test_flags_and_file_are_validated_together(config_file: Path) -> None:
    """--min-sync-period 2m on the command line is more than the file's syncPeriod of 1m."""
    with pytest.raises(ConfigError, match="--min-sync-period"):
        build("--config", str(config_file), "--min-sync-period", "2m")


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (None, FileError, r"--config .*kube-proxy.yaml: cannot read: No such file"),
        ("mode: iptables\nmetricsBindAddress: [unclosed\n", FileError,
         r"--config .*kube-proxy.yaml: line 3, column 1: did not find expected ',' or '\]'"),
        ("kind: KubeletConfiguration\n", ConfigError, "expected KubeProxyConfiguration"),
        ("- a list\n", ConfigError, "expected a KubeProxyConfiguration mapping"),
    ],
)
def test_bad_config_file(tmp_path: Path, content: str | None, error: type[Exception], message: str) -> None:
    """A config file that cannot be read or parsed names the file and the line (the agent exits 1
    on it); one that parses but is not a KubeProxyConfiguration is a configuration error."""
    path = tmp_path / "kube-proxy.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=message):
        build("--config", str(path), "--hostname-override", "node-a")


def test_malformed_files_exit_1_naming_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--config, --source and --kubeconfig: a file that does not parse stops the agent at start-up
    with exit code 1 and a message naming the file and line."""
    from agent.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Service\nmetadata: {name: [x\n")
    cases = [
        ["--config", str(bad), "--hostname-override", "node-a"],
        ["--source", str(bad), "--hostname-override", "node-a", "--once"],
        ["--kubeconfig", str(bad), "--hostname-override", "node-a", "--once"],
    ]
    for args in cases:
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert f"{bad}: line 3, column 1:" in err, err
    broken_json = tmp_path / "objects.json"
    broken_json.write_text('{"kind": "List",\n "items": [}\n')
    assert main(["--source", str(broken_json), "--hostname-override", "node-a", "--once"]) == 1
    assert f"--source {broken_json}: line 2: not valid JSON" in capsys.readouterr().err


def test_bad_flag_value() -> None:
    with pytest.raises(ConfigError, match="--sync-period"):
        build("--hostname-override", "node-a", "--sync-period", "30")


def test_hostname_defaults_to_the_lowercased_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    """Like kube-proxy, the node name is the hostname in lower case unless overridden."""
    monkeypatch.setattr(socket, "gethostname", lambda: "Worker-1.Example")
    assert build().hostname_override == "worker-1.example"


def test_health_check_node_port_says_503_while_the_proxy_is_unhealthy() -> None:
    """kube-proxy's health check server answers 503 (serviceProxyHealthy false) when the proxy
    itself is unhealthy, even with local endpoints: the node's rules may be stale."""
    healthy = [True]
    hc = ServiceHealthServers(bind_ip="127.0.0.1", proxy_healthy=lambda: healthy[0])
    try:
        port = free_port()
        hc.update({port: HealthCheckService("shop", "web", port, 2)})
        code, body, _ = get(port)
        assert code == 200 and body["serviceProxyHealthy"] is True
        healthy[0] = False
        code, body, _ = get(port)
        assert code == 503 and body["serviceProxyHealthy"] is False and body["localEndpoints"] == 2
    finally:
        hc.close()
