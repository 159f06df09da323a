"""Modes are plug-ins: one list in the registry, each mode's package holds its settings, metrics,
design note and cleanup, and the shared code (sync loop, metrics, CLI) names none of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from agent import cli
from agent.backends import registry
from agent.backends.base import UnsupportedMode
from agent.config import AgentConfig, ConfigError, from_config_file
from agent.kernel.xtables import cleanup_text, parse_save

ROOT = Path(__file__).resolve().parents[2]
SHARED = [ROOT / "agent" / "cli.py", ROOT / "agent" / "metrics.py", *sorted((ROOT / "agent" / "sync").glob("*.py"))]


@pytest.mark.parametrize("path", SHARED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shared_code_names_no_mode(path: Path) -> None:
    text = path.read_text()
    for mode in registry.MODES:
        assert not re.search(rf"\b{mode}\b", text), f"{path.name} names the {mode} mode"


@pytest.mark.parametrize("spec", registry.SPECS, ids=lambda s: s.name)
def test_every_mode_has_its_package_design_note_and_settings_with_its_prefix(spec: registry.ModeSpec) -> None:
    package = ROOT / "agent" / "backends" / spec.name
    assert (package / "mode.py").is_file() and (package / "__init__.py").is_file()
    if spec.built:
        note = (package / "README.md").read_text()
        for heading in ("What it programs", "What it owns", "What others may rely on", "Bad state"):
            assert f"## {heading}" in note, f"{spec.name}/README.md lacks '## {heading}'"
    for s in spec.settings:
        assert s.flag.startswith(f"--{spec.name}-"), s.flag  # kube-proxy's names: --ipvs-scheduler ...
        assert not s.config or s.config[0] == spec.name


def test_modes_not_built_say_so_and_name_what_works() -> None:
    for spec in registry.SPECS:
        if spec.built:
            continue
        with pytest.raises(UnsupportedMode, match="--proxy-mode nftables"):
            registry.make_backend(spec.name, (4,)).check_supported()


def test_a_mode_registers_only_its_own_metrics() -> None:
    """kube-proxy's iptables metrics exist only in iptables mode, nftables' only in nftables mode."""
    names: dict[str, set[str]] = {}
    for mode in ("iptables", "nftables"):
        reg = CollectorRegistry()
        registry.make_backend(mode, (4,), registry=reg)
        names[mode] = {m.name for m in reg.collect()}
    assert "kubeproxy_sync_proxy_rules_iptables_restore_failures" in names["iptables"]
    assert not any("nftables" in n for n in names["iptables"])
    assert "kubeproxy_sync_proxy_rules_nftables_sync_failures" in names["nftables"]
    assert not any("iptables" in n for n in names["nftables"])


def build(*argv: str) -> AgentConfig:
    return cli.build_config(cli._parser().parse_args(["--hostname-override", "n", *argv]))


def test_mode_settings_from_flags_reach_only_their_mode_with_defaults_filled() -> None:
    cfg = build("--proxy-mode", "ipvs", "--ipvs-scheduler", "sh", "--ipvs-strict-arp", "true",
                "--ipvs-exclude-cidrs", "10.0.0.0/8,192.168.0.0/16", "--ipvs-udp-timeout", "5s")
    assert cfg.mode_settings == {"ipvs_scheduler": "sh", "ipvs_strict_arp": True,
                                 "ipvs_exclude_cidrs": ("10.0.0.0/8", "192.168.0.0/16"), "ipvs_udp_timeout": 5.0}
    opts = registry.spec("ipvs").options((4,), cfg.mode_settings)
    assert opts.settings["ipvs_scheduler"] == "sh" and opts.settings["ipvs_tcp_timeout"] == 0.0
    assert registry.spec("iptables").options((4,), cfg.mode_settings).settings == {
        "iptables_localhost_nodeports": True}  # its own default, untouched by the ipvs flags
    off = build("--iptables-localhost-nodeports", "false")
    assert registry.spec("iptables").options((4,), off.mode_settings).settings == {
        "iptables_localhost_nodeports": False}
    doc = {"iptables": {"localhostNodePorts": False}}
    assert from_config_file(doc, registry.settings())["mode_settings"] == {"iptables_localhost_nodeports": False}


def test_a_modes_sync_period_wins_only_in_that_mode() -> None:
    assert build("--proxy-mode", "ipvs", "--ipvs-sync-period", "5s", "--ipvs-min-sync-period", "0s").sync_period == 5.0
    assert build("--proxy-mode", "nftables", "--ipvs-sync-period", "5s").sync_period == 30.0


def test_mode_settings_from_the_config_file_section() -> None:
    doc = {"mode": "ipvs", "ipvs": {"scheduler": "lc", "strictARP": True, "tcpTimeout": "900s",
                                    "excludeCIDRs": ["10.1.0.0/16"]}}
    values = from_config_file(doc, registry.settings())
    assert values["mode_settings"] == {"ipvs_scheduler": "lc", "ipvs_strict_arp": True, "ipvs_tcp_timeout": 900.0,
                                       "ipvs_exclude_cidrs": ("10.1.0.0/16",)}
    with pytest.raises(ConfigError, match=r"ipvs\.tcpTimeout"):
        from_config_file({"ipvs": {"tcpTimeout": "soon"}}, registry.settings())
    with pytest.raises(ConfigError, match="--ipvs-strict-arp"):
        build("--ipvs-strict-arp", "maybe")


def test_a_modes_cleanup_never_matches_another_modes_prefix() -> None:
    """Chains are found by prefix: KPA- (iptables) must not match another mode's KPAV- helpers."""
    save = "\n".join([
        "*nat", ":KPA-SERVICES - [0:0]", ":KPAV-SERVICES - [0:0]",
        "-A PREROUTING -m comment --comment kube-proxy-agent -j KPA-SERVICES",
        "-A PREROUTING -m comment --comment kube-proxy-agent -j KPAV-SERVICES",
        "COMMIT", ""])
    text = cleanup_text(parse_save(save, "KPA-"))
    assert "KPA-SERVICES" in text and "KPAV" not in text


def test_cleanup_of_many_chains_is_batched_jumps_first_then_flush_then_delete() -> None:
    lines = ["*nat", *(f":KPA-C{i} - [0:0]" for i in range(5)),
             "-A OUTPUT -m comment --comment kube-proxy-agent -j KPA-C0", "-A KPA-C0 -j KPA-C4", "COMMIT", ""]
    from agent.kernel.xtables import cleanup_batches

    batches = cleanup_batches(parse_save("\n".join(lines), "KPA-"), batch=2)
    assert batches[0] == "*nat\n-D OUTPUT -m comment --comment kube-proxy-agent -j KPA-C0\nCOMMIT\n"
    assert batches[1:4] == ["*nat\n:KPA-C0 - [0:0]\n:KPA-C1 - [0:0]\nCOMMIT\n",
                            "*nat\n:KPA-C2 - [0:0]\n:KPA-C3 - [0:0]\nCOMMIT\n", "*nat\n:KPA-C4 - [0:0]\nCOMMIT\n"]
    assert batches[4:] == ["*nat\n-X KPA-C0\n-X KPA-C1\nCOMMIT\n", "*nat\n-X KPA-C2\n-X KPA-C3\nCOMMIT\n",
                           "*nat\n-X KPA-C4\nCOMMIT\n"]


def test_nftables_mode_defaults_to_primary_node_port_addresses() -> None:
    """kube-proxy's nftables mode takes NodePorts on the node's primary IPs unless
    --nodeport-addresses says otherwise; the other modes on every address."""
    assert registry.spec("nftables").default_nodeport_addresses == ("primary",)
    assert all(registry.spec(m).default_nodeport_addresses == () for m in ("iptables", "ipvs", "ebpf"))
