#!/usr/bin/env bash
# Delete the kind cluster created by deploy/kind/up.sh (KIND_CLUSTER_NAME, default kpa).
set -euo pipefail
# shellcheck source=deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

CLUSTER="${KIND_CLUSTER_NAME:-kpa}"
need_cmd kind "install it from https://kind.sigs.k8s.io/docs/user/quick-start/#installation (e.g. 'go install sigs.k8s.io/kind@latest')"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    kind delete cluster --name "$CLUSTER"
else
    log "no kind cluster named $CLUSTER; nothing to do"
fi
