"""Static checks of the deployment files: manifests/, deploy/, the Grafana dashboard and the workflows.

Pure file checks (PyYAML and json only): no cluster, kustomize or Docker needed.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.backends import registry

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
DEPLOY = ROOT / "deploy"
NAMESPACE = "kube-proxy-agent"

# The agent's command-line contract.
CONTRACT_FLAGS = {
    "--proxy-mode", "--kubeconfig", "--hostname-override", "--cluster-cidr", "--masquerade-all",
    "--nodeport-addresses", "--metrics-bind-address", "--healthz-bind-address", "--sync-period",
    "--min-sync-period", "--config", "-v", "--cleanup", "--source", "--once",
}
PROXY_MODES = set(registry.MODES)
IMPLEMENTED_MODES = {s.name for s in registry.SPECS if s.built}  # what the e2e-kind workflow runs
# The KubeProxyConfiguration subset --config reads (plus the standard apiVersion/kind header).
CONFIG_KEYS = {
    "apiVersion", "kind", "mode", "clusterCIDR", "metricsBindAddress", "healthzBindAddress",
    "nodePortAddresses", "iptables", "hostnameOverride",
}
CONFIG_IPTABLES_KEYS = {"masqueradeAll", "syncPeriod", "minSyncPeriod"}
METRICS = {
    "kubeproxy_sync_proxy_rules_duration_seconds",
    "kubeproxy_network_programming_duration_seconds",
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
    "kubeproxy_sync_proxy_rules_service_changes_pending",
    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "kubeproxy_sync_proxy_rules_nftables_transaction_failures_total",
    "kubeproxyagent_invalid_objects_total",
}
HISTOGRAMS = {"kubeproxy_sync_proxy_rules_duration_seconds", "kubeproxy_network_programming_duration_seconds"}
HEALTHZ_PORT = 10256
METRICS_PORT = 10249


def load_all(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def objects() -> list[dict[str, Any]]:
    """Every Kubernetes object in manifests/ (recursively)."""
    return [d for p in sorted(MANIFESTS.rglob("*.yaml")) for d in load_all(p) if d.get("kind") != "Kustomization"]


def the(kind: str, name: str = NAMESPACE) -> dict[str, Any]:
    found = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name} in manifests/, found {len(found)}"
    return found[0]


def daemonset() -> dict[str, Any]:
    return the("DaemonSet")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = daemonset()["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec()["containers"]
    assert len(containers) == 1
    return containers[0]


def agent_config() -> dict[str, Any]:
    cfg: dict[str, Any] = yaml.safe_load(the("ConfigMap")["data"]["config.yaml"])
    return cfg


def kustomizations() -> list[Path]:
    return sorted({*MANIFESTS.rglob("kustomization.yaml"), *DEPLOY.rglob("kustomization.yaml")})


def yaml_files() -> list[Path]:
    return sorted({*MANIFESTS.rglob("*.yaml"), *DEPLOY.rglob("*.yaml"), *(ROOT / ".github").rglob("*.yml")})


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path} has no YAML documents"
    for doc in docs:
        assert isinstance(doc, dict)


def test_every_object_is_namespaced_in_the_agent_namespace() -> None:
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for obj in objects():
        ns = obj["metadata"].get("namespace")
        if obj["kind"] in cluster_scoped:
            assert ns is None, obj["metadata"]["name"]
        else:
            assert ns == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("path", kustomizations(), ids=lambda p: str(p.relative_to(ROOT)))
def test_kustomization_lists_files_that_exist(path: Path) -> None:
    (k,) = load_all(path)
    assert k["kind"] == "Kustomization"
    base = path.parent
    listed: list[str] = list(k.get("resources", [])) + list(k.get("components", []))
    listed += [p["path"] for p in k.get("patches", []) if "path" in p]
    for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        listed += [f.split("=", 1)[-1] for f in gen.get("files", [])]
    assert listed, f"{path} lists nothing"
    for entry in listed:
        target = (base / entry).resolve()
        assert target.exists(), f"{path.relative_to(ROOT)} lists {entry}, which does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{entry} is not a kustomization directory"


def test_base_kustomization_covers_every_manifest() -> None:
    (k,) = load_all(MANIFESTS / "kustomization.yaml")
    on_disk = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(k["resources"]) == on_disk


def test_clusterrole_grants_exactly_what_the_agent_needs() -> None:
    granted: set[tuple[str, str, str]] = set()
    for rule in the("ClusterRole")["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, "no resourceNames/nonResourceURLs expected"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    granted.add((group, resource, verb))
    expected = {
        *((g, r, v) for g, r in [("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices"),
                                 ("networking.k8s.io", "servicecidrs")]
          for v in ("get", "list", "watch")),
        *((g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")),
    }
    assert granted == expected


def test_clusterrolebinding_binds_the_serviceaccount() -> None:
    binding = the("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAMESPACE}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NAMESPACE, "namespace": NAMESPACE}]
    the("ServiceAccount")
    assert pod_spec()["serviceAccountName"] == NAMESPACE


def test_daemonset_pod_settings() -> None:
    ds = daemonset()
    spec = pod_spec()
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    c = container()
    assert c["image"] == "kube-proxy-agent:dev"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}}
    caps = set(c["securityContext"]["capabilities"]["add"])
    assert caps == {"NET_ADMIN", "NET_RAW", "SYS_RESOURCE", "SYS_MODULE"}
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert not c["securityContext"].get("privileged", False), "only the ebpf and ipvs overlays run privileged"


def test_daemonset_probes_use_the_healthz_port() -> None:
    c = container()
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": HEALTHZ_PORT}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": HEALTHZ_PORT}


def test_daemonset_args_use_contract_flags() -> None:
    c = container()
    assert "command" not in c, "the image's ENTRYPOINT is the agent"
    env = {e["name"]: e for e in c["env"]}
    flags: dict[str, str | None] = {}
    for arg in c["args"]:
        assert arg.startswith("-"), f"unexpected positional argument {arg!r}"
        name, _, value = arg.partition("=")
        assert name in CONTRACT_FLAGS, f"{name} is not in the agent's command-line contract"
        flags[name] = value or None
        for ref in re.findall(r"\$\(([A-Z_]+)\)", value):
            assert ref in env, f"{arg} refers to ${ref}, which the container does not define"
    assert flags["--hostname-override"] == "$(NODE_NAME)"
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert flags["--proxy-mode"] == "$(PROXY_MODE)"
    assert env["PROXY_MODE"]["valueFrom"]["configMapKeyRef"] == {"name": NAMESPACE, "key": "PROXY_MODE"}
    config_path = flags["--config"]
    assert config_path == "/etc/kube-proxy-agent/config.yaml"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    config_mount = next(m for m in mounts.values() if m["mountPath"] == str(Path(config_path).parent))
    assert volumes[config_mount["name"]]["configMap"]["name"] == NAMESPACE


def test_api_server_override_is_optional() -> None:
    env = {e["name"]: e for e in container()["env"]}
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        ref = env[name]["valueFrom"]["configMapKeyRef"]
        assert ref == {"name": "kube-proxy-agent-apiserver", "key": name, "optional": True}


def test_daemonset_host_mounts() -> None:
    c = container()
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}

    def host_path(mount_path: str) -> dict[str, Any]:
        hp: dict[str, Any] = volumes[mounts[mount_path]["name"]]["hostPath"]
        assert hp["path"] == mount_path
        return hp

    host_path("/lib/modules")
    assert mounts["/lib/modules"]["readOnly"] is True
    assert host_path("/run/xtables.lock")["type"] == "FileOrCreate"
    host_path("/sys/fs/bpf")
    host_path("/sys/fs/cgroup")


def test_configmap_config_is_the_contract_subset() -> None:
    data = the("ConfigMap")["data"]
    cfg = agent_config()
    assert set(cfg) <= CONFIG_KEYS, f"unknown keys: {set(cfg) - CONFIG_KEYS}"
    assert set(cfg.get("iptables", {})) <= CONFIG_IPTABLES_KEYS
    assert cfg["kind"] == "KubeProxyConfiguration"
    assert cfg["mode"] == "iptables"
    assert data["PROXY_MODE"] == cfg["mode"], "the two mode settings must agree"
    assert cfg["healthzBindAddress"].rsplit(":", 1)[1] == str(HEALTHZ_PORT)


def test_configmap_mode_lines_match_what_deploy_scripts_rewrite() -> None:
    # deploy/lib.sh rewrites exactly these two lines from PROXY_MODE.
    lines = (MANIFESTS / "configmap.yaml").read_text().splitlines()
    assert lines.count("  PROXY_MODE: iptables") == 1
    assert lines.count("    mode: iptables") == 1
    lib = (DEPLOY / "lib.sh").read_text()
    assert "s/^  PROXY_MODE: iptables\\$/" in lib
    assert "s/^    mode: iptables\\$/" in lib


def test_metrics_are_exposed_for_scraping() -> None:
    assert agent_config()["metricsBindAddress"] == f"0.0.0.0:{METRICS_PORT}"
    ports = {p["name"]: p for p in container()["ports"]}
    assert ports["metrics"]["containerPort"] == METRICS_PORT
    assert ports["healthz"]["containerPort"] == HEALTHZ_PORT
    annotations = daemonset()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)


def test_podmonitor_selects_the_agent_pods_metrics_port() -> None:
    pm = the("PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    pod_labels = daemonset()["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_monitoring_kustomization_generates_the_dashboard_configmap() -> None:
    (k,) = load_all(MANIFESTS / "monitoring" / "kustomization.yaml")
    (gen,) = k["configMapGenerator"]
    assert gen["files"] == ["grafana-dashboard.json"]
    assert gen["options"]["labels"]["grafana_dashboard"] == "1"


def metric_names(expr: str) -> set[str]:
    names = set()
    for name in re.findall(r"\bkubeproxy(?:agent)?_[a-z_]+", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        names.add(base if base in HISTOGRAMS else name)
    return names


def test_metric_names_helper() -> None:
    assert metric_names("rate(kubeproxy_sync_proxy_rules_duration_seconds_bucket[5m])") == {
        "kubeproxy_sync_proxy_rules_duration_seconds"}
    assert metric_names("rate(kubeproxy_bogus_count[5m])") == {"kubeproxy_bogus_count"}


def test_grafana_dashboard() -> None:
    dash = json.loads((MANIFESTS / "monitoring" / "grafana-dashboard.json").read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    used: set[str] = set()
    for panel in panels:
        exprs = [t["expr"] for t in panel["targets"]]
        assert exprs, panel["title"]
        for expr in exprs:
            names = metric_names(expr)
            assert names, f"panel {panel['title']!r}: {expr} uses no agent metric"
            assert names <= METRICS, f"panel {panel['title']!r}: unknown metrics {names - METRICS}"
            used |= names
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            assert metric_names(json.dumps(var["query"])) <= METRICS
    assert {
        "kubeproxy_sync_proxy_rules_duration_seconds", "kubeproxy_network_programming_duration_seconds",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending", "kubeproxy_sync_proxy_rules_service_changes_pending",
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
        "kubeproxy_sync_proxy_rules_nftables_transaction_failures_total", "kubeproxyagent_invalid_objects_total",
    } <= used


@pytest.mark.parametrize("mode", ["ebpf", "ipvs"])
def test_mode_overlay_only_makes_the_container_privileged(mode: str) -> None:
    (patch,) = load_all(DEPLOY / mode / "privileged.yaml")
    assert (patch["kind"], patch["metadata"]["name"]) == ("DaemonSet", NAMESPACE)
    pod = patch["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c == {"name": container()["name"], "securityContext": {"privileged": True}}
    # the eBPF mode destroys stale UDP sockets in pods' network namespaces, found through their processes
    assert set(pod) - {"containers"} == ({"hostPID"} if mode == "ebpf" else set())


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-ebpf.yaml"])
def test_kind_cluster_has_no_kube_proxy(name: str) -> None:
    (cfg,) = load_all(DEPLOY / "kind" / name)
    assert cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert cfg["networking"]["kubeProxyMode"] == "none"
    assert cfg["networking"]["podSubnet"] == agent_config()["clusterCIDR"]
    assert [n["role"] for n in cfg["nodes"]] == ["control-plane", "worker", "worker"]


def test_kind_ebpf_config_only_adds_mounts() -> None:
    (base,) = load_all(DEPLOY / "kind" / "cluster.yaml")
    (ebpf,) = load_all(DEPLOY / "kind" / "cluster-ebpf.yaml")
    for node in ebpf["nodes"]:
        assert node.pop("extraMounts") == [{"hostPath": "/usr/src", "containerPath": "/usr/src", "readOnly": True}]
    assert ebpf == base


@pytest.mark.parametrize(
    "path", sorted(DEPLOY.rglob("*.sh")), ids=lambda p: str(p.relative_to(ROOT)))
def test_scripts_are_strict(path: Path) -> None:
    text = path.read_text()
    if path.name == "lib.sh":  # sourced, inherits the caller's options
        assert text.startswith("# shellcheck shell=bash")
        return
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert path.stat().st_mode & 0o111, f"{path} is not executable"


def make_targets() -> set[str]:
    text = (ROOT / "mk" / "deploy.mk").read_text()
    return set(re.findall(r"^([a-z0-9][a-z0-9-]*):", text, flags=re.M))


def test_workflow_commands_are_documented_make_targets() -> None:
    targets = make_targets()
    docs = (ROOT / "docs" / "deploy.md").read_text()
    (wf,) = load_all(ROOT / ".github" / "workflows" / "e2e-kind.yml")
    (job,) = wf["jobs"].values()
    assert set(job["strategy"]["matrix"]["mode"]) == IMPLEMENTED_MODES
    runs = [step["run"] for step in job["steps"] if "run" in step]
    assert runs
    for run in runs:
        plain = re.sub(r"\$\{\{[^}]*\}\}", "X", run)  # GitHub expressions
        words = [w for w in shlex.split(plain) if not re.fullmatch(r"[A-Z_]+=.*", w)]
        assert words[0] == "make" and len(words) == 2, f"workflow step {run!r} is not a single make target"
        assert words[1] in targets, f"make {words[1]} is not defined in mk/deploy.mk"
        assert f"make {words[1]}" in docs, f"make {words[1]} is not documented in docs/deploy.md"


def test_deploy_make_targets() -> None:
    assert {"image", "kind-up", "kind-down", "kind-check", "k3d-up", "k3d-down"} <= make_targets()
