#!/usr/bin/env bash
# Build a real Kubernetes control plane (kube-apiserver, kube-controller-manager,
# kube-proxy) and etcd from the Go module proxy, pinned by tests/cluster/go.mod,
# into ${KPA_CACHE:-$HOME/.cache/kube-proxy-agent}/k8s/<version>/bin.
#
# Progress goes to stderr; on success the bin dir is the last (only) line of
# stdout, so callers can do:  BIN=$(tests/cluster/build.sh | tail -1)
#
# Environment:
#   KPA_CACHE   cache root (default $HOME/.cache/kube-proxy-agent)
#   GO          go binary to use (default: go on PATH, else /usr/local/go/bin/go)
#   GOPROXY, GOMODCACHE, GOCACHE are honoured as usual.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { printf '%s\n' "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

VERSION="$(tr -d '[:space:]' < "$HERE/VERSION")"
[[ "$VERSION" =~ ^v1\.[0-9]+\.[0-9]+$ ]] || die "bad version '$VERSION' in $HERE/VERSION"
grep -qE "^[[:space:]]*k8s\.io/kubernetes $VERSION\$" "$HERE/go.mod" \
    || die "$HERE/VERSION says $VERSION but go.mod does not require k8s.io/kubernetes $VERSION; keep them in sync"

CACHE_ROOT="${KPA_CACHE:-$HOME/.cache/kube-proxy-agent}"
BIN_DIR="$CACHE_ROOT/k8s/$VERSION/bin"
BINARIES=(kube-apiserver kube-controller-manager kube-proxy etcd)

have_all() {
    local b
    for b in "${BINARIES[@]}"; do [[ -x "$BIN_DIR/$b" ]] || return 1; done
}

if have_all; then
    log "reusing cached control plane in $BIN_DIR"
    printf '%s\n' "$BIN_DIR"
    exit 0
fi

# ---- Go toolchain check -----------------------------------------------------
REQUIRED_GO="$(awk '$1=="go"{print $2; exit}' "$HERE/go.mod")"
if [[ -z "${GO:-}" ]]; then
    if command -v go >/dev/null 2>&1; then GO=go
    elif [[ -x /usr/local/go/bin/go ]]; then GO=/usr/local/go/bin/go
    else die "Go >= $REQUIRED_GO is required to build the test control plane, but no 'go' was found on PATH.
Install Go $REQUIRED_GO or newer from https://go.dev/dl/ (e.g. into /usr/local/go) and put it on PATH, or set GO=/path/to/go."
    fi
fi
# GOTOOLCHAIN=local: use exactly this go, never auto-download another toolchain.
export GOTOOLCHAIN=local
HAVE_GO="$(cd / && "$GO" env GOVERSION 2>/dev/null || true)"
HAVE_GO="${HAVE_GO#go}"
if [[ -z "$HAVE_GO" ]] || [[ "$(printf '%s\n%s\n' "$REQUIRED_GO" "$HAVE_GO" | sort -V | head -1)" != "$REQUIRED_GO" ]]; then
    die "Go >= $REQUIRED_GO is required to build Kubernetes $VERSION, but '$GO' is go${HAVE_GO:-<unknown>}.
Install Go $REQUIRED_GO or newer from https://go.dev/dl/ and put it first on PATH, or set GO=/path/to/newer/go."
fi

export CGO_ENABLED=0
export GOFLAGS="-mod=mod -buildvcs=false"
cd "$HERE"

mkdir -p "$CACHE_ROOT/k8s/$VERSION"
# Serialise concurrent builds of the same version.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE_ROOT/k8s/$VERSION/.build.lock"
    flock 9
    if have_all; then
        log "reusing cached control plane in $BIN_DIR"
        printf '%s\n' "$BIN_DIR"
        exit 0
    fi
fi

# ---- module download ------------------------------------------------------------
log "downloading Go modules for Kubernetes $VERSION (GOPROXY=$("$GO" env GOPROXY))..."
if ! dl_err="$("$GO" mod download 2>&1)"; then
    die "cannot reach the Go module proxy (GOPROXY=$("$GO" env GOPROXY)): $dl_err
Check network access to the proxy, or set GOPROXY to a reachable mirror (e.g. GOPROXY=https://goproxy.io,direct),
or pre-populate the module cache ($("$GO" env GOMODCACHE)) on a connected machine and re-run with GOPROXY=off."
fi

# ---- build ------------------------------------------------------------------
K8S_MINOR="${VERSION#v1.}"; K8S_MINOR="${K8S_MINOR%%.*}"
K8S_DATE="$("$GO" list -m -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes)"
K8S_LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    K8S_LDFLAGS+=" -X $pkg.gitVersion=$VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$K8S_MINOR"
    K8S_LDFLAGS+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=${K8S_DATE:-1970-01-01T00:00:00Z}"
done

STAGE="$CACHE_ROOT/k8s/$VERSION/bin.tmp.$$"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"

build() { # name package approx-minutes ldflags
    local name="$1" pkg="$2" mins="$3" ldflags="$4" t0=$SECONDS
    log "building $name (first time takes ~$mins min)..."
    "$GO" build -trimpath -ldflags="$ldflags" -o "$STAGE/$name" "$pkg" \
        || die "go build of $name ($pkg) failed"
    log "  built $name in $((SECONDS - t0))s"
}

# Minutes measured with a cold GOCACHE on 2 cores (total ~5.5 min); later
# binaries reuse the packages compiled for kube-apiserver.
build kube-apiserver          k8s.io/kubernetes/cmd/kube-apiserver          4 "$K8S_LDFLAGS"
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager 2 "$K8S_LDFLAGS"
build kube-proxy              k8s.io/kubernetes/cmd/kube-proxy              1 "$K8S_LDFLAGS"
build etcd                    go.etcd.io/etcd/server/v3                     1 "-s -w"

mkdir -p "$BIN_DIR"
for b in "${BINARIES[@]}"; do mv -f "$STAGE/$b" "$BIN_DIR/$b"; done
log "control plane $VERSION ready in $BIN_DIR"
printf '%s\n' "$BIN_DIR"
