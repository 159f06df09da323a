#!/usr/bin/env bash
# Create (or reuse) the single-node k3d cluster "kpa" with k3s's kube-proxy
# disabled (flannel stays), import the agent image and run kube-proxy-agent.
#
#   PROXY_MODE=iptables|nftables|ipvs|ebpf  (default iptables)
#   K3D_CLUSTER_NAME                        (default kpa)
#   KPA_IMAGE                               (default kube-proxy-agent:dev)
set -euo pipefail
# shellcheck source=deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

CLUSTER="${K3D_CLUSTER_NAME:-kpa}"
CTX="k3d-$CLUSTER"

check_mode
need_docker_cli
need_cmd k3d "install it from https://k3d.io (e.g. 'curl -s https://raw.githubusercontent.com/k3d-io/k3d/main/install.sh | bash')"
need_kubectl
need_docker

# The k3s node container has no /lib/modules or /usr/src of its own: ipvs mode
# modprobes ip_vs* and ebpf mode needs kernel headers, so mount the host's.
extra=()
case "$PROXY_MODE" in
    ipvs) extra=(--volume '/lib/modules:/lib/modules:ro@server:*') ;;
    ebpf) extra=(--volume '/lib/modules:/lib/modules:ro@server:*' --volume '/usr/src:/usr/src:ro@server:*') ;;
esac

if k3d cluster list --no-headers 2>/dev/null | awk '{print $1}' | grep -qx "$CLUSTER"; then
    log "k3d cluster $CLUSTER exists; reusing it (host mounts for ipvs/ebpf are only added at creation)"
else
    log "creating k3d cluster $CLUSTER (kube-proxy disabled, flannel on, traefik off)"
    # --cluster-cidr matches clusterCIDR in manifests/configmap.yaml (k3s's
    # default would be 10.42.0.0/16). Traefik is not needed for the agent.
    k3d cluster create "$CLUSTER" \
        --k3s-arg '--disable-kube-proxy@server:*' \
        --k3s-arg '--disable=traefik@server:*' \
        --k3s-arg '--cluster-cidr=10.244.0.0/16@server:*' \
        ${extra[@]+"${extra[@]}"}
fi

build_image
log "importing $KPA_IMAGE into the k3d nodes"
k3d image import "$KPA_IMAGE" --cluster "$CLUSTER"

deploy_agent "$CTX"
wait_ready "$CTX"
print_success "$CTX" k3d-check
