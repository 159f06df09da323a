"""AgentConfig: kube-proxy's flag names and defaults, from flags and a KubeProxyConfiguration file."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.model.state import PRIMARY

if TYPE_CHECKING:
    from agent.backends.base import Setting


class ConfigError(ValueError):
    """A flag or config file value is wrong; the message names it and what is expected."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    proxy_mode: str = "iptables"
    kubeconfig: str | None = None
    hostname_override: str = ""
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    nodeport_addresses: tuple[str, ...] = ()
    metrics_bind_address: str = "127.0.0.1:10249"
    healthz_bind_address: str = "0.0.0.0:10256"
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    source: str | None = None
    once: bool = False
    cleanup_kube_proxy: bool = False  # a takeover: remove kube-proxy's rules once ours serve
    verbosity: int = 0
    # mode-specific settings given by flag or config file (Setting.name -> value); a mode gets its
    # own, with defaults for the rest
    mode_settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(text: str | int | float, what: str) -> float:
    """Go-style durations as kube-proxy takes them: 30s, 1m0s, 500ms, 1h."""
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip()
    if s == "0":
        return 0.0
    total, pos = 0.0, 0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ConfigError(f"{what}: {text!r} is not a duration; use e.g. 30s, 1m, 500ms")
    return total


def _items(text: str | list[str]) -> list[str]:
    """A config list, or a comma-separated flag value without its empty parts."""
    return text if isinstance(text, list) else [t for t in text.split(",") if t.strip()]


def parse_nodeport_addresses(text: str | list[str], what: str) -> tuple[str, ...]:
    """CIDRs, or ("primary",) alone, as kube-proxy takes --nodeport-addresses."""
    items = _items(text)
    if any(str(i).strip() == PRIMARY for i in items):
        if len(items) != 1:
            raise ConfigError(f"{what}: 'primary' cannot be combined with CIDRs; give one or the other")
        return (PRIMARY,)
    return parse_cidrs(items, what)


def parse_cidrs(text: str | list[str], what: str) -> tuple[str, ...]:
    out = []
    for item in _items(text):
        try:
            if "/" not in item:
                raise ValueError("no prefix length")
            out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError as exc:
            raise ConfigError(f"{what}: {item!r} is not a CIDR (e.g. 10.244.0.0/16)") from exc
    return tuple(out)


def parse_bind(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: {text!r} is not HOST:PORT (e.g. 0.0.0.0:10256)")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_setting(setting: Setting, raw: Any, what: str) -> Any:
    """A mode setting's value from a flag (text) or a config file (YAML scalar or list)."""
    if setting.kind == "duration":
        return parse_duration(raw, what)
    if setting.kind == "cidrs":
        return parse_cidrs(raw, what) if raw else ()
    if setting.kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text not in ("true", "false", "1", "0"):
            raise ConfigError(f"{what}: {raw!r} is not true or false")
        return text in ("true", "1")
    if setting.kind == "int":
        try:
            return int(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{what}: {raw!r} is not a whole number") from exc
    value = str(raw)
    if setting.choices and value not in setting.choices:
        raise ConfigError(f"{what}: {value!r} is not one of {', '.join(setting.choices)}")
    return value


def mode_settings_from(doc: dict[str, Any], settings: Iterable[Setting]) -> dict[str, Any]:
    """Mode settings found in a KubeProxyConfiguration (e.g. `ipvs: {scheduler: sh}`)."""
    out: dict[str, Any] = {}
    for s in settings:
        node: Any = doc
        for part in s.config:
            node = node.get(part) if isinstance(node, dict) else None
        if s.config and node not in (None, "", []):
            out[s.name] = parse_setting(s, node, ".".join(s.config))
    return out


def from_config_file(doc: dict[str, Any], settings: Iterable[Setting] = ()) -> dict[str, Any]:
    """The KubeProxyConfiguration subset we read, as AgentConfig field values."""
    if doc.get("kind", "KubeProxyConfiguration") != "KubeProxyConfiguration":
        raise ConfigError(f"--config: kind is {doc.get('kind')!r}, expected KubeProxyConfiguration")
    out: dict[str, Any] = {}
    if doc.get("mode"):
        out["proxy_mode"] = doc["mode"]
    if doc.get("clusterCIDR"):
        out["cluster_cidrs"] = parse_cidrs(doc["clusterCIDR"], "clusterCIDR")
    if doc.get("hostnameOverride"):
        out["hostname_override"] = doc["hostnameOverride"]
    if doc.get("metricsBindAddress"):
        out["metrics_bind_address"] = doc["metricsBindAddress"]
    if doc.get("healthzBindAddress"):
        out["healthz_bind_address"] = doc["healthzBindAddress"]
    if doc.get("nodePortAddresses"):
        out["nodeport_addresses"] = parse_nodeport_addresses(doc["nodePortAddresses"], "nodePortAddresses")
    ipt = doc.get("iptables") or {}
    if "masqueradeAll" in ipt:
        out["masquerade_all"] = bool(ipt["masqueradeAll"])
    for key, name in (("syncPeriod", "sync_period"), ("minSyncPeriod", "min_sync_period")):
        value = doc.get(key) or ipt.get(key) or (doc.get("nftables") or {}).get(key)
        if value:
            out[name] = parse_duration(value, key)
    cc = doc.get("clientConnection") or {}
    if cc.get("kubeconfig"):
        out["kubeconfig"] = cc["kubeconfig"]
    found = mode_settings_from(doc, settings)
    if found:
        out["mode_settings"] = found
    return out


def validate(cfg: AgentConfig) -> None:
    from agent.backends.registry import MODES  # the one list of modes

    if cfg.proxy_mode not in MODES:
        raise ConfigError(f"--proxy-mode {cfg.proxy_mode!r} is not one of {', '.join(MODES)}")
    parse_bind(cfg.metrics_bind_address, "--metrics-bind-address")
    parse_bind(cfg.healthz_bind_address, "--healthz-bind-address")
    if cfg.sync_period <= 0:
        raise ConfigError("--sync-period must be positive (e.g. 30s)")
    if cfg.min_sync_period < 0 or cfg.min_sync_period > cfg.sync_period:
        raise ConfigError("--min-sync-period must be between 0 and --sync-period")
