# shellcheck shell=bash
# Helpers shared by deploy/kind/up.sh and deploy/k3d/up.sh (sourced, not run).

# Repository root, whatever the caller's working directory.
KPA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KPA_NAMESPACE=kube-proxy-agent
KPA_IMAGE="${KPA_IMAGE:-kube-proxy-agent:dev}"
PROXY_MODE="${PROXY_MODE:-iptables}"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# need_cmd NAME HINT: fail with an install hint when NAME is not on PATH.
need_cmd() {
    command -v "$1" >/dev/null 2>&1 || die "$1 not found: $2"
}

# need_docker: the docker CLI is installed (call first) / the engine answers.
need_docker_cli() {
    need_cmd docker "install Docker Engine from https://docs.docker.com/engine/install/"
}

need_docker() {
    docker info >/dev/null 2>&1 \
        || die "docker is installed but the Docker engine is not reachable ('docker info' failed): start dockerd, or check DOCKER_HOST and your permissions on the socket"
}

need_kubectl() {
    need_cmd kubectl "install it from https://kubernetes.io/docs/tasks/tools/"
}

check_mode() {
    case "$PROXY_MODE" in
        iptables | nftables | ipvs | ebpf) ;;
        *) die "PROXY_MODE=$PROXY_MODE: must be one of iptables, nftables, ipvs, ebpf" ;;
    esac
}

build_image() {
    log "building $KPA_IMAGE from $KPA_ROOT"
    docker build -t "$KPA_IMAGE" "$KPA_ROOT"
}

# deploy_agent CONTEXT: install the manifests with the image and mode chosen by
# KPA_IMAGE and PROXY_MODE, pointed at the cluster's real API server address.
deploy_agent() {
    local ctx="$1" tmp api_host api_port old_mode="" src
    local -a k=(kubectl --context "$ctx")

    "${k[@]}" apply -f "$KPA_ROOT/manifests/namespace.yaml"

    # The agent cannot reach the API through the `kubernetes` Service ClusterIP
    # before it has programmed it (there is no kube-proxy), so give it the
    # address behind that Service, taken from its EndpointSlice.
    api_host="$("${k[@]}" -n default get endpointslices -l kubernetes.io/service-name=kubernetes \
        -o jsonpath='{.items[0].endpoints[0].addresses[0]}')"
    api_port="$("${k[@]}" -n default get endpointslices -l kubernetes.io/service-name=kubernetes \
        -o jsonpath='{.items[0].ports[0].port}')"
    [[ -n "$api_host" && -n "$api_port" ]] \
        || die "could not read the API server address from the default/kubernetes EndpointSlice"
    log "agent will reach the API server at $api_host:$api_port"
    "${k[@]}" -n "$KPA_NAMESPACE" create configmap kube-proxy-agent-apiserver \
        --from-literal=KUBERNETES_SERVICE_HOST="$api_host" \
        --from-literal=KUBERNETES_SERVICE_PORT="$api_port" \
        --dry-run=client -o yaml | "${k[@]}" apply -f -

    old_mode="$("${k[@]}" -n "$KPA_NAMESPACE" get configmap kube-proxy-agent \
        -o jsonpath='{.data.PROXY_MODE}' 2>/dev/null || true)"

    # Render a copy of the manifests with the mode (and image) substituted.
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064 # expand $tmp now
    trap "rm -rf '$tmp'" EXIT
    mkdir -p "$tmp/deploy"
    cp -R "$KPA_ROOT/manifests" "$tmp/manifests"
    cp -R "$KPA_ROOT/deploy/ebpf" "$tmp/deploy/ebpf"
    cp -R "$KPA_ROOT/deploy/ipvs" "$tmp/deploy/ipvs"
    sed -i.bak -e "s/^  PROXY_MODE: iptables\$/  PROXY_MODE: $PROXY_MODE/" \
        -e "s/^    mode: iptables\$/    mode: $PROXY_MODE/" "$tmp/manifests/configmap.yaml"
    sed -i.bak -e "s|^\( *image:\) kube-proxy-agent:dev\$|\1 $KPA_IMAGE|" "$tmp/manifests/daemonset.yaml"
    [[ "$(grep -cE "^  PROXY_MODE: $PROXY_MODE\$|^    mode: $PROXY_MODE\$" "$tmp/manifests/configmap.yaml")" == 2 ]] \
        || die "could not set the mode in manifests/configmap.yaml (expected lines '  PROXY_MODE: iptables' and '    mode: iptables')"
    src="$tmp/manifests"
    if [[ "$PROXY_MODE" == ebpf || "$PROXY_MODE" == ipvs ]]; then src="$tmp/deploy/$PROXY_MODE"; fi

    log "applying manifests (mode $PROXY_MODE, image $KPA_IMAGE)"
    "${k[@]}" apply -k "$src"

    if [[ -n "$old_mode" && "$old_mode" != "$PROXY_MODE" ]]; then
        log "mode changed from $old_mode to $PROXY_MODE: restarting the agents"
        log "note: rules left by $old_mode mode stay in the kernel unless the agent cleans them up;"
        log "      for a clean switch recreate the cluster (make kind-down / make k3d-down)"
        "${k[@]}" -n "$KPA_NAMESPACE" rollout restart ds/kube-proxy-agent
    fi
}

# wait_ready CONTEXT: agent rolled out, nodes Ready, CoreDNS Ready (CoreDNS
# reaches the API through the `kubernetes` ClusterIP, so this proves the agent
# programs Services).
wait_ready() {
    local ctx="$1"
    local -a k=(kubectl --context "$ctx")
    log "waiting for the kube-proxy-agent DaemonSet"
    if ! "${k[@]}" -n "$KPA_NAMESPACE" rollout status ds/kube-proxy-agent --timeout=180s; then
        "${k[@]}" -n "$KPA_NAMESPACE" get pods -o wide >&2 || true
        "${k[@]}" -n "$KPA_NAMESPACE" logs ds/kube-proxy-agent --tail=50 >&2 || true
        die "kube-proxy-agent did not become ready (see the pods and log above)"
    fi
    log "waiting for the nodes"
    "${k[@]}" wait --for=condition=Ready nodes --all --timeout=180s
    log "waiting for CoreDNS"
    "${k[@]}" -n kube-system rollout status deploy/coredns --timeout=180s \
        || die "CoreDNS did not become ready: it reaches the API server through the kubernetes Service ClusterIP, so check the agent's log (kubectl -n $KPA_NAMESPACE logs ds/kube-proxy-agent)"
}

# print_success CONTEXT CHECK_TARGET
print_success() {
    local ctx="$1" check="$2"
    local -a k=(kubectl --context "$ctx")
    "${k[@]}" -n "$KPA_NAMESPACE" get pods -o wide
    "${k[@]}" -n kube-system get pods -l k8s-app=kube-dns -o wide
    cat <<EOF

kube-proxy-agent is running in $PROXY_MODE mode (kubectl context $ctx).
Success looks like the output above: one kube-proxy-agent pod per node, all
1/1 READY and Running, and CoreDNS 1/1 READY (it reaches the API server through
the 'kubernetes' Service ClusterIP, which only the agent programs here).

Next: make $check   # ClusterIP, DNS, NodePort and metrics smoke test
EOF
}
