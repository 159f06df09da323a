#!/usr/bin/env bash
# Create (or reuse) the kind cluster "kpa" without kube-proxy, build the agent
# image, load it into the nodes and run kube-proxy-agent as the node proxy.
#
#   PROXY_MODE=iptables|nftables|ipvs|ebpf  (default iptables)
#   KIND_CLUSTER_NAME                       (default kpa)
#   KPA_IMAGE                               (default kube-proxy-agent:dev)
set -euo pipefail
# shellcheck source=deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

CLUSTER="${KIND_CLUSTER_NAME:-kpa}"
CTX="kind-$CLUSTER"
CONFIG="$KPA_ROOT/deploy/kind/cluster.yaml"
if [[ "$PROXY_MODE" == ebpf ]]; then CONFIG="$KPA_ROOT/deploy/kind/cluster-ebpf.yaml"; fi

check_mode
if [[ "$PROXY_MODE" == ipvs ]]; then
    # kind nodes are containers sharing this machine's kernel: IPVS must be in it
    if [[ ! -e /proc/net/ip_vs ]]; then
        log "loading IPVS modules on this machine (kind nodes share its kernel)"
        mods=(ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh ip_set xt_set nf_conntrack)
        if [[ $EUID -eq 0 ]]; then modprobe -a "${mods[@]}"; else sudo -n modprobe -a "${mods[@]}"; fi \
            || die "PROXY_MODE=ipvs needs IPVS in this machine's kernel: run 'sudo modprobe -a ${mods[*]}'"
    fi
fi
need_docker_cli
need_cmd kind "install it from https://kind.sigs.k8s.io/docs/user/quick-start/#installation (e.g. 'go install sigs.k8s.io/kind@latest')"
need_kubectl
need_docker

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    log "kind cluster $CLUSTER exists; reusing it"
    if [[ "$PROXY_MODE" == ebpf ]] \
        && ! docker inspect -f '{{range .Mounts}}{{.Destination}} {{end}}' "$CLUSTER-control-plane" | grep -qw /usr/src; then
        log "warning: this cluster was not created with deploy/kind/cluster-ebpf.yaml, so the nodes lack the host's"
        log "         /usr/src (kernel headers for bcc); if the agent cannot compile its BPF programs, run"
        log "         'make kind-down' and 'PROXY_MODE=ebpf make kind-up' again"
    fi
else
    log "creating kind cluster $CLUSTER from ${CONFIG#"$KPA_ROOT"/}"
    kind create cluster --name "$CLUSTER" --config "$CONFIG"
fi

build_image
log "loading $KPA_IMAGE into the kind nodes"
kind load docker-image "$KPA_IMAGE" --name "$CLUSTER"

deploy_agent "$CTX"
wait_ready "$CTX"
print_success "$CTX" kind-check
