#!/usr/bin/env bash
# Smoke test of a cluster whose node proxy is kube-proxy-agent (make kind-check,
# make k3d-check, and the e2e-kind workflow).
#
#   deploy/check.sh [KUBECTL_CONTEXT]     (default: the current context)
#
# 1. a Deployment of 2 agnhost netexec pods behind a NodePort Service;
# 2. from a client pod: the ClusterIP answers, from both backends, and so does
#    the Service's DNS name (CoreDNS itself depends on the agent);
# 3. the NodePort answers on every node's InternalIP, from the client pod and,
#    when the nodes are local Docker containers (kind, k3d), from inside a node
#    with `docker exec`;
# 4. each agent's metrics (:10249/metrics) and health (:10256/healthz) answer,
#    through the API server's node proxy, or `docker exec <node> curl` as a
#    fallback.
# Leaves nothing behind unless KEEP_CHECK=1 (namespace kpa-check).
set -euo pipefail
# shellcheck source=deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

need_kubectl
CTX="${1:-$(kubectl config current-context)}"
NS=kpa-check
AGNHOST=registry.k8s.io/e2e-test-images/agnhost:2.47
k=(kubectl --context "$CTX")
kc=("${k[@]}" -n "$NS")

diagnose() {
    log "diagnostics"
    "${k[@]}" get nodes -o wide >&2 || true
    "${kc[@]}" get pods,svc,endpointslices -o wide >&2 || true
    "${k[@]}" -n "$KPA_NAMESPACE" get pods -o wide >&2 || true
    "${k[@]}" -n "$KPA_NAMESPACE" logs ds/kube-proxy-agent --tail=40 >&2 || true
}
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    diagnose
    exit 1
}
ok() { printf 'ok: %s\n' "$*"; }
cleanup() {
    if [[ "${KEEP_CHECK:-0}" != 1 ]]; then
        "${k[@]}" delete namespace "$NS" --ignore-not-found --timeout=90s >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

# retry TRIES SLEEP CMD...: run CMD until it succeeds; print its last output.
retry() {
    local tries="$1" pause="$2" i out
    shift 2
    for ((i = 1; i <= tries; i++)); do
        if out="$("$@" 2>&1)"; then
            printf '%s\n' "$out"
            return 0
        fi
        sleep "$pause"
    done
    printf '%s\n' "$out" >&2
    return 1
}

# in_client URL: HTTP GET from the client pod.
in_client() {
    "${kc[@]}" exec kpa-client -- curl -fsS --max-time 5 "$1"
}

# on_node NODE URL: HTTP GET from inside a node container (kind and k3d nodes
# are Docker containers named like the node). k3s nodes may only have wget.
on_node() {
    docker exec "$1" sh -c \
        'if command -v curl >/dev/null 2>&1; then curl -fsS --max-time 5 "$0"; else wget -q -T 5 -O- "$0"; fi' "$2"
}

node_is_container() {
    command -v docker >/dev/null 2>&1 && docker inspect "$1" >/dev/null 2>&1
}

log "context $CTX: deploying the test workload in namespace $NS"
"${k[@]}" create namespace "$NS" --dry-run=client -o yaml | "${k[@]}" apply -f - >/dev/null
"${kc[@]}" apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: netexec
spec:
  replicas: 2
  selector:
    matchLabels: {app: netexec}
  template:
    metadata:
      labels: {app: netexec}
    spec:
      affinity:
        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
            - weight: 100
              podAffinityTerm:
                topologyKey: kubernetes.io/hostname
                labelSelector:
                  matchLabels: {app: netexec}
      containers:
        - name: netexec
          image: $AGNHOST
          args: ["netexec", "--http-port=8080"]
          ports:
            - containerPort: 8080
          readinessProbe:
            httpGet: {path: /hostname, port: 8080}
            periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: netexec
spec:
  type: NodePort
  selector: {app: netexec}
  ports:
    - name: http
      port: 80
      targetPort: 8080
---
apiVersion: v1
kind: Pod
metadata:
  name: kpa-client
spec:
  containers:
    - name: client
      image: $AGNHOST
      args: ["pause"]
EOF

"${kc[@]}" rollout status deploy/netexec --timeout=180s || fail "the netexec Deployment did not become ready"
"${kc[@]}" wait --for=condition=Ready pod/kpa-client --timeout=180s || fail "the client pod did not become ready"

CLUSTER_IP="$("${kc[@]}" get svc netexec -o jsonpath='{.spec.clusterIP}')"
NODE_PORT="$("${kc[@]}" get svc netexec -o jsonpath='{.spec.ports[0].nodePort}')"
read -r -a BACKENDS <<<"$("${kc[@]}" get pods -l app=netexec -o jsonpath='{.items[*].metadata.name}')"
[[ ${#BACKENDS[@]} -eq 2 && -n "$CLUSTER_IP" && -n "$NODE_PORT" ]] \
    || fail "expected 2 netexec pods, a ClusterIP and a NodePort (got: ${BACKENDS[*]:-none}, '$CLUSTER_IP', '$NODE_PORT')"

# --- ClusterIP ----------------------------------------------------------------
retry 30 2 in_client "http://$CLUSTER_IP/hostname" >/dev/null \
    || fail "ClusterIP $CLUSTER_IP:80 does not answer from the client pod"
seen=""
for _ in $(seq 1 30); do
    name="$(in_client "http://$CLUSTER_IP/hostname")" || fail "ClusterIP $CLUSTER_IP:80 stopped answering"
    seen+="$name"$'\n'
done
for b in "${BACKENDS[@]}"; do
    grep -qx "$b" <<<"$seen" \
        || fail "ClusterIP never reached backend $b in 30 requests (reached: $(sort -u <<<"$seen" | xargs))"
done
ok "ClusterIP $CLUSTER_IP:80 answers, load-balanced over ${BACKENDS[*]}"

retry 15 2 in_client "http://netexec.$NS.svc.cluster.local/hostname" >/dev/null \
    || fail "the Service DNS name netexec.$NS.svc.cluster.local does not answer (CoreDNS or its ClusterIP)"
ok "Service DNS name netexec.$NS.svc.cluster.local answers"

# --- NodePort -------------------------------------------------------------------
read -r -a NODES <<<"$("${k[@]}" get nodes -o jsonpath='{.items[*].metadata.name}')"
[[ ${#NODES[@]} -gt 0 ]] || fail "no nodes found"
FROM_NODE="${NODES[0]}"
for node in "${NODES[@]}"; do
    ip="$("${k[@]}" get node "$node" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')"
    ip="${ip%% *}"
    retry 15 2 in_client "http://$ip:$NODE_PORT/hostname" >/dev/null \
        || fail "NodePort $ip:$NODE_PORT ($node) does not answer from the client pod"
    if node_is_container "$FROM_NODE"; then
        retry 15 2 on_node "$FROM_NODE" "http://$ip:$NODE_PORT/hostname" >/dev/null \
            || fail "NodePort $ip:$NODE_PORT ($node) does not answer from inside node $FROM_NODE"
        ok "NodePort $ip:$NODE_PORT ($node) answers from the client pod and from node $FROM_NODE"
    else
        ok "NodePort $ip:$NODE_PORT ($node) answers from the client pod (no local node container for docker exec)"
    fi
done

# --- agent metrics and health ------------------------------------------------------
read -r -a AGENT_NODES <<<"$("${k[@]}" -n "$KPA_NAMESPACE" get pods -l app.kubernetes.io/name=kube-proxy-agent \
    -o jsonpath='{.items[*].spec.nodeName}')"
[[ ${#AGENT_NODES[@]} -gt 0 ]] || fail "no kube-proxy-agent pods found"
for node in "${AGENT_NODES[@]}"; do
    if ! metrics="$("${k[@]}" get --raw "/api/v1/nodes/$node:10249/proxy/metrics" 2>/dev/null)"; then
        node_is_container "$node" || fail "metrics of the agent on $node not reachable through the node proxy"
        metrics="$(on_node "$node" http://127.0.0.1:10249/metrics)" \
            || fail "metrics of the agent on $node do not answer (node proxy and 127.0.0.1:10249 both failed)"
    fi
    grep -q '^kubeproxy_sync_proxy_rules_duration_seconds_count' <<<"$metrics" \
        || fail "metrics of the agent on $node lack kubeproxy_sync_proxy_rules_duration_seconds"
    if ! "${k[@]}" get --raw "/api/v1/nodes/$node:10256/proxy/healthz" >/dev/null 2>&1; then
        if ! { node_is_container "$node" && on_node "$node" http://127.0.0.1:10256/healthz >/dev/null; }; then
            fail "healthz of the agent on $node does not answer"
        fi
    fi
    ok "agent on $node: /metrics has kubeproxy_* series, /healthz answers"
done

printf '\nall checks passed (context %s)\n' "$CTX"
