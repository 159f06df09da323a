#!/usr/bin/env bash
# Delete the k3d cluster created by deploy/k3d/up.sh (K3D_CLUSTER_NAME, default kpa).
set -euo pipefail
# shellcheck source=deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

CLUSTER="${K3D_CLUSTER_NAME:-kpa}"
need_cmd k3d "install it from https://k3d.io (e.g. 'curl -s https://raw.githubusercontent.com/k3d-io/k3d/main/install.sh | bash')"
if k3d cluster list --no-headers 2>/dev/null | awk '{print $1}' | grep -qx "$CLUSTER"; then
    k3d cluster delete "$CLUSTER"
else
    log "no k3d cluster named $CLUSTER; nothing to do"
fi
