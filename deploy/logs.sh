#!/usr/bin/env bash
# Dump what is needed to debug a failed deployment or check (make kind-logs,
# make k3d-logs; the e2e-kind workflow runs it on failure).
#
#   deploy/logs.sh [KUBECTL_CONTEXT]     (default: the current context)
set -euo pipefail
# Every command is allowed to fail (|| true): print as much as possible.
# shellcheck source=deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

need_kubectl
CTX="${1:-$(kubectl config current-context)}"
k=(kubectl --context "$CTX")

section() { printf '\n===== %s =====\n' "$*"; }

section "nodes"
"${k[@]}" get nodes -o wide || true
section "pods (all namespaces)"
"${k[@]}" get pods -A -o wide || true
section "kubectl -n $KPA_NAMESPACE describe pods"
"${k[@]}" -n "$KPA_NAMESPACE" describe pods || true
section "kubectl -n $KPA_NAMESPACE logs ds/kube-proxy-agent"
"${k[@]}" -n "$KPA_NAMESPACE" logs ds/kube-proxy-agent --tail=-1 || true
for pod in $("${k[@]}" -n "$KPA_NAMESPACE" get pods -o name || true); do
    section "logs $pod (current, then previous if it restarted)"
    "${k[@]}" -n "$KPA_NAMESPACE" logs "$pod" --tail=-1 --timestamps || true
    "${k[@]}" -n "$KPA_NAMESPACE" logs "$pod" --previous --tail=-1 --timestamps 2>/dev/null || true
done
section "kube-proxy-agent ConfigMaps"
"${k[@]}" -n "$KPA_NAMESPACE" get configmaps -o yaml || true
section "events (all namespaces, last 60)"
"${k[@]}" get events -A --sort-by=.lastTimestamp | tail -n 60 || true
