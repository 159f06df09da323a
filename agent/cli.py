"""Command line: flags + config file -> AgentConfig; builds the objects and runs them."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import log as logsetup
from agent.backends import registry
from agent.backends.base import Backend, SyncError, UnsupportedMode
from agent.config import (
    AgentConfig,
    ConfigError,
    from_config_file,
    parse_bind,
    parse_cidrs,
    parse_duration,
    parse_nodeport_addresses,
    parse_setting,
    validate,
)
from agent.files import FileError, documents
from agent.health import ProxyHealth, ServiceHealthServers, health_responder, serve
from agent.kernel.commands import CommandError
from agent.metrics import Metrics
from agent.model.state import ClusterModel
from agent.sources.file import FileSource
from agent.sync.loop import SyncLoop
from agent.sync.runner import Runner, Schedule

if TYPE_CHECKING:
    from agent.sources.kube_events import NodeEventRecorder

log = logging.getLogger("agent")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kube-proxy-agent",
        description="Node agent replacing kube-proxy. `kube-proxy-agent render ...` prints what a mode "
        "would program without touching the kernel.",
    )
    a = p.add_argument
    a("--proxy-mode", choices=registry.MODES, help=f"how Services are programmed (default {registry.DEFAULT_MODE})")
    a("--kubeconfig", help="kubeconfig file; in-cluster config when absent")
    a("--hostname-override", help="this node's name (default: the hostname)")
    a("--cluster-cidr", help="pod CIDRs, comma separated; traffic from outside is masqueraded")
    a("--masquerade-all", action="store_true", default=None, help="SNAT all service traffic")
    a("--nodeport-addresses", help="CIDRs whose local addresses take NodePorts, or 'primary' (the node's "
      "primary IPs from its Node object); default: the mode's, as kube-proxy's (all addresses, or primary)")
    a("--metrics-bind-address", help="HOST:PORT for /metrics (default 127.0.0.1:10249)")
    a("--healthz-bind-address", help="HOST:PORT for /healthz and /livez (default 0.0.0.0:10256)")
    a("--sync-period", help="full resync interval (default 30s)")
    a("--min-sync-period", help="minimum interval between syncs (default 1s)")
    a("--config", help="KubeProxyConfiguration YAML; flags given explicitly win")
    a("--source", help="read Services/EndpointSlices/Nodes from this YAML file or directory, not the API")
    a("--once", action="store_true", help="sync once and exit (non-zero if the sync failed)")
    a("--cleanup", action="store_true", help="remove every rule this mode created, then exit")
    a("--cleanup-kube-proxy", action="store_true", default=None,
      help="take over from kube-proxy: once this agent's first sync serves, remove the chains and tables "
      "kube-proxy programmed (never the kubelet's); stop kube-proxy first")
    a("-v", "--v", dest="verbosity", type=int, default=None, help="log verbosity (4+ is debug)")
    modes = p.add_argument_group("mode settings (read by the mode they belong to)")
    for setting in registry.settings():
        modes.add_argument(setting.flag, dest="mode:" + setting.name, metavar=setting.kind.upper(),
                           help=f"{setting.help} (default {setting.default!r})")
    return p


def build_config(ns: argparse.Namespace) -> AgentConfig:
    values: dict[str, Any] = {}
    settings = registry.settings()
    if ns.config:
        docs = documents(Path(ns.config), "--config")  # FileError names the file and line
        doc = (docs[0] if docs else None) or {}
        if not isinstance(doc, dict):
            raise ConfigError(f"--config {ns.config}: expected a KubeProxyConfiguration mapping, "
                              f"not {type(doc).__name__}")
        values.update(from_config_file(doc, settings))
    flag_map: dict[str, Any] = {
        "proxy_mode": ns.proxy_mode,
        "kubeconfig": ns.kubeconfig,
        "hostname_override": ns.hostname_override,
        "cluster_cidrs": parse_cidrs(ns.cluster_cidr, "--cluster-cidr") if ns.cluster_cidr else None,
        "masquerade_all": ns.masquerade_all,
        "nodeport_addresses": (parse_nodeport_addresses(ns.nodeport_addresses, "--nodeport-addresses")
                               if ns.nodeport_addresses else None),
        "metrics_bind_address": ns.metrics_bind_address,
        "healthz_bind_address": ns.healthz_bind_address,
        "sync_period": parse_duration(ns.sync_period, "--sync-period") if ns.sync_period else None,
        "min_sync_period": (parse_duration(ns.min_sync_period, "--min-sync-period")
                            if ns.min_sync_period else None),
        "source": ns.source,
        "once": ns.once or None,
        "cleanup_kube_proxy": ns.cleanup_kube_proxy,
        "verbosity": ns.verbosity,
    }
    values.update({k: v for k, v in flag_map.items() if v is not None})
    mode_settings = dict(values.get("mode_settings", {}))
    for setting in settings:
        raw = getattr(ns, "mode:" + setting.name, None)
        if raw is not None:
            mode_settings[setting.name] = parse_setting(setting, raw, setting.flag)
    if mode_settings:
        values["mode_settings"] = mode_settings
    # a mode's own period settings (its --<mode>-sync-period, say) win while that mode runs
    mode = values.get("proxy_mode", registry.DEFAULT_MODE)
    if mode in registry.MODES:
        for setting in registry.spec(mode).settings:
            if setting.overrides and setting.name in mode_settings:
                values[setting.overrides] = mode_settings[setting.name]
    known = {f.name for f in fields(AgentConfig)}
    cfg = AgentConfig(**{k: v for k, v in values.items() if k in known})
    if not cfg.hostname_override:
        cfg = replace(cfg, hostname_override=socket.gethostname().lower())
    validate(cfg)
    return cfg


def _model(cfg: AgentConfig, frontends: bool = False) -> ClusterModel:
    nodeports = cfg.nodeport_addresses or registry.spec(cfg.proxy_mode).default_nodeport_addresses
    return ClusterModel(cfg.hostname_override, cfg.cluster_cidrs, cfg.masquerade_all, nodeports,
                        frontends=frontends or registry.spec(cfg.proxy_mode).frontends)


def _backend(cfg: AgentConfig, families: tuple[int, ...] | None = None, metrics: Metrics | None = None) -> Backend:
    return registry.make_backend(cfg.proxy_mode, families, cfg.mode_settings,
                                 metrics.registry if metrics is not None else None)


def _loop(cfg: AgentConfig, backend: Backend, metrics: Metrics, health: ProxyHealth,
          hc: ServiceHealthServers | None, frontends: bool = False) -> SyncLoop:
    from agent.kernel.addresses import local_ips

    owned = registry.spec(cfg.proxy_mode).owned_links  # a mode's own interfaces hold no node address
    return SyncLoop(_model(cfg, frontends), backend, metrics, health, node_name=cfg.hostname_override,
                    local_ips=lambda: local_ips(owned), hc_servers=hc)


def cmd_render(cfg: AgentConfig, what: str) -> int:
    if not cfg.source:
        print("render needs --source PATH (a YAML file or directory of Services, EndpointSlices, Nodes)",
              file=sys.stderr)
        return 2
    backend = _backend(cfg, (4, 6))
    metrics = Metrics()
    loop = _loop(cfg, backend, metrics, ProxyHealth(2 * cfg.sync_period), None, frontends=what == "frontends")
    src = FileSource(cfg.source, loop)
    src.check()
    src.load_once(keep=False)
    loop.refresh_node_addresses()
    loop.model.drain()
    if what == "desired":
        for fam in (4, 6):
            sys.stdout.write(loop.model.desired[fam].table())
    elif what == "frontends":
        for fam in (4, 6):
            fronts = loop.model.desired[fam].frontends
            sys.stdout.write(f"# IPv{fam} frontends={len(fronts)}\n{fronts.table()}")
    else:
        sys.stdout.write(backend.render(loop.model.desired))
    return 0


def remove_other_modes(cfg: AgentConfig, backend: Backend) -> None:
    """Once this mode serves, remove what any other mode of ours left on the node (a mode switch:
    the new datapath first, then the old one goes), and with --cleanup-kube-proxy what upstream
    kube-proxy left (a takeover). Each mode removes only its own state."""
    if cfg.cleanup_kube_proxy:
        # a mode that adopts kube-proxy's kernel objects (same address and port) keeps them
        keep: Callable[[Any], bool] = getattr(backend, "serves_virtual_server", lambda _key: False)
        steps = registry.kube_proxy_cleanup_steps(keep)
        done = 0
        for step in steps:
            try:
                lines = step()
            except (CommandError, OSError, RuntimeError) as exc:
                log.warning("could not remove kube-proxy's rules error=%r; what was removed stays removed; "
                            "stop kube-proxy and run `kube-proxy --cleanup`, or restart this agent to retry",
                            str(exc))
                break
            for line in lines:
                log.info("takeover from kube-proxy: %s", line)
            done += len(lines)
        else:
            if not done:
                log.info("takeover from kube-proxy: nothing of kube-proxy's found on this node")
    for spec in registry.SPECS:
        if spec.name == cfg.proxy_mode:
            continue
        try:
            registry.make_backend(spec.name, None, cfg.mode_settings).cleanup()
        except Exception as exc:  # a leftover stays (logged); the running mode is unaffected
            log.warning("could not remove what mode %s left error=%r; remove it with --cleanup --proxy-mode %s",
                        spec.name, str(exc), spec.name)


def run_daemon(cfg: AgentConfig) -> int:
    metrics = Metrics()
    backend = _backend(cfg, metrics=metrics)
    backend.check_supported()
    log.info("starting kube-proxy-agent mode=%s node=%s source=%s cluster_cidrs=%s", cfg.proxy_mode,
             cfg.hostname_override, cfg.source or ("kubeconfig " + cfg.kubeconfig if cfg.kubeconfig
                                                  else "in-cluster"), ",".join(cfg.cluster_cidrs) or "-")
    health = ProxyHealth(timeout=2 * cfg.sync_period)
    hc = None if cfg.once else ServiceHealthServers(
        proxy_healthy=lambda: health.status(check_node=False)[0])
    loop = _loop(cfg, backend, metrics, health, hc)
    backend.start()
    switched = threading.Thread(target=remove_other_modes, args=(cfg, backend), name="mode-switch", daemon=True)
    loop.on_first_sync = switched.start
    if not cfg.once:
        host, port = parse_bind(cfg.metrics_bind_address, "--metrics-bind-address")
        if port:
            from agent.sync.inspect import metrics_responder

            serve((host, port), metrics_responder(loop, health, metrics.registry, cfg.sync_period))
        hhost, hport = parse_bind(cfg.healthz_bind_address, "--healthz-bind-address")
        if hport:
            def count(path: str, code: int) -> None:
                (metrics.healthz if path == "/healthz" else metrics.livez).labels(str(code)).inc()
            serve((hhost, hport), health_responder(health, count))

    stop = threading.Event()
    source: Any
    recorder: NodeEventRecorder | None = None
    if cfg.source:
        source = FileSource(cfg.source, loop)
        source.check()
    else:
        from agent.sources.kube import KubeSource, load_client_config

        kube_cfg = load_client_config(cfg.kubeconfig)
        source = KubeSource(kube_cfg, loop, cfg.hostname_override)
        source.on_error.append(lambda kind: metrics.api_errors.labels(kind).inc())
        source.on_state.append(loop.source_state)
        if not cfg.once:
            from agent.sources.kube_events import NodeEventRecorder

            recorder = NodeEventRecorder(kube_cfg, cfg.hostname_override,
                                         on_error=lambda kind: metrics.api_errors.labels(kind).inc())
            loop.on_event = recorder.emit
            recorder.emit("Normal", "Starting", "StartKubeProxyAgent",
                          f"Starting kube-proxy-agent (proxy mode {cfg.proxy_mode})")

    if cfg.once:
        if cfg.source:
            source.load_once(keep=False)
        else:
            source.start()
            if not loop.ready.wait(120):
                print("--once: the API did not deliver a full list within 120s", file=sys.stderr)
                return 1
        ok = loop.sync(full=True)
        if not ok:
            print("sync failed; see the log line above for the reason", file=sys.stderr)
        elif switched.ident is not None:
            switched.join(120)
        backend.close(60)  # e.g. the stale UDP flows that sync found, before exiting
        return 0 if ok else 1

    runner = Runner(loop.sync, Schedule(cfg.min_sync_period, cfg.sync_period, retry_interval=cfg.min_sync_period
                                        or 1.0))
    loop.trigger = runner.run
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    source.start()
    while not loop.ready.wait(0.2):
        if stop.is_set():
            backend.close(5)
            return 0
    runner.start()
    # Python runs signal handlers in the main thread only, and a SIGTERM the kernel delivers to
    # another thread does not interrupt a main thread blocked on a lock (a plain stop.wait() could
    # miss it: SIGTERM ignored). The C-level handler writes every signal to the wakeup fd whichever
    # thread takes it, so the main thread sleeps on that fd (no polling at idle) and runs the
    # handler when it wakes.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    while not stop.is_set():
        select.select([wake_r], [], [], 60)
        with contextlib.suppress(BlockingIOError):
            os.read(wake_r, 512)
    log.info("stopping; programmed rules stay in place (use --cleanup to remove them)")
    source.stop()
    runner.stop()
    if hc is not None:
        hc.close()
    backend.close(5)  # leaves the datapath serving; finishes the mode's queued cleanup
    if recorder is not None:
        recorder.close()
    return 0


def cmd_explain(cfg: AgentConfig, name: str, output: str, probe: bool, all_steps: bool) -> int:
    """Exit 0 when nothing is wrong, 1 when a step found a problem, 2 when it could not ask."""
    from agent import ask
    from agent.model.explain import render_text
    from agent.model.serviceport import NamespacedName
    from agent.sync.inspect import explain_service

    ns_name, _, svc = name.partition("/")
    if not ns_name or not svc:
        print(f"explain: give NAMESPACE/NAME, not {name!r}", file=sys.stderr)
        return 2
    if cfg.source:  # offline: the files, no kernel
        loop = _loop(cfg, _backend(cfg, (4, 6)), Metrics(), ProxyHealth(2 * cfg.sync_period), None)
        src = FileSource(cfg.source, loop)
        src.check()
        src.load_once(keep=False)
        loop.refresh_node_addresses()
        loop.model.drain()
        data = explain_service(loop, NamespacedName(ns_name, svc), cfg.sync_period, kernel=False).as_dict()
    else:
        try:
            data = ask.fetch(ask.agent_url(cfg.metrics_bind_address, ask.explain_path(name)))
        except OSError as exc:
            print(f"explain: {exc}", file=sys.stderr)
            return 2
    if probe:
        data = ask.with_probe(data)
    ask.emit(data, output, render_text(data, all_steps))
    return 0 if data["ok"] else 1


def cmd_status(cfg: AgentConfig, output: str) -> int:
    from agent import ask
    from agent.sync.inspect import render_status

    try:
        data = ask.fetch(ask.agent_url(cfg.metrics_bind_address, "/status?output=json"))
    except OSError as exc:
        print(f"status: {exc}", file=sys.stderr)
        return 2
    ask.emit(data, output, render_status(data))
    return 0 if data["health"]["healthy"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args and args[0] in ("render", "explain", "status") else ""
    parser = _parser()
    if command:
        args = args[1:]
        parser.prog += " " + command
    if command == "render":
        parser.add_argument("--desired", action="store_true", help="print the mode-independent desired state")
        parser.add_argument("--frontends", action="store_true",
                            help="print every frontend (address:port/protocol) with its endpoints")
    if command == "explain":
        parser.add_argument("service", metavar="NAMESPACE/NAME", help="the Service to explain")
        parser.add_argument("--probe", action="store_true", help="also connect from here to each frontend")
        parser.add_argument("--all", action="store_true", help="show every step, not only up to the first problem")
    if command in ("explain", "status"):
        parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    ns = parser.parse_args(args)
    try:
        cfg = build_config(ns)
    except ConfigError as exc:
        print(f"kube-proxy-agent: {exc}", file=sys.stderr)
        return 2
    except FileError as exc:  # a file given that does not parse: the message names it and the line
        print(f"kube-proxy-agent: {exc}", file=sys.stderr)
        return 1
    logsetup.setup(cfg.verbosity)
    try:
        if command == "render":
            return cmd_render(cfg, "desired" if ns.desired else "frontends" if ns.frontends else "mode")
        if command == "explain":
            return cmd_explain(cfg, ns.service, ns.output, ns.probe, ns.all)
        if command == "status":
            return cmd_status(cfg, ns.output)
        if ns.cleanup:
            try:
                _backend(cfg).cleanup()
            except (SyncError, CommandError) as exc:
                print(f"kube-proxy-agent: --cleanup --proxy-mode {cfg.proxy_mode} failed: {exc}; "
                      "what was removed stays removed, run it again", file=sys.stderr)
                return 1
            log.info("cleanup done mode=%s", cfg.proxy_mode)
            return 0
        return run_daemon(cfg)
    except UnsupportedMode as exc:
        print(f"kube-proxy-agent: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"kube-proxy-agent: {exc}", file=sys.stderr)
        return 2
    except FileError as exc:
        print(f"kube-proxy-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
