# kube-proxy-agent node image.
#
#   docker build -t kube-proxy-agent:dev .        (or: make image)
#
# Stage 1 (builder) builds the agent as a wheel and installs it, with its PyPI
# dependencies, into a venv at /opt/kube-proxy-agent. Stage 2 (runtime) is the
# same Debian base with only the runtime tools; it copies that venv over. Both
# stages use Debian's /usr/bin/python3 (3.11 on bookworm), so the venv's
# interpreter symlink is valid in the runtime stage. The venv is created with
# --system-site-packages so the agent can import the Debian-packaged bindings
# that are not on PyPI: python3-nftables (`import nftables`) and python3-bpfcc
# (`import bcc`).
#
# Kernel headers (ebpf mode only): bcc compiles its programs on the node at
# start-up and needs headers that match the *host* kernel exactly, which an
# image cannot know in advance. The image therefore ships no kernel headers;
# the DaemonSet mounts the host's /lib/modules (whose <version>/build link
# points into /usr/src) and /usr/src read-only. If the host has no headers
# package installed, bcc falls back to the kernel's own copy in
# /sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS; bcc runs `modprobe kheaders`,
# hence kmod, xz-utils and the /lib/modules mount). Install your distribution's
# linux-headers-$(uname -r) on the nodes if neither is available.

ARG DEBIAN_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS builder

ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Build tools live only in this stage (python3-dev/build-essential are there
# for any dependency that has no binary wheel for the target architecture).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        build-essential \
        ca-certificates \
        python3 \
        python3-dev \
        python3-venv \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml ./
COPY agent/ agent/

# Build the agent wheel, then install it and its dependencies from PyPI into
# the venv that the runtime stage copies. --ignore-installed: every dependency
# goes into the venv, even if this stage happens to have a Debian copy that
# the runtime stage would not have.
RUN python3 -m venv --system-site-packages /opt/kube-proxy-agent \
 && /opt/kube-proxy-agent/bin/pip wheel --no-deps --wheel-dir /dist . \
 && /opt/kube-proxy-agent/bin/pip install --ignore-installed /dist/kube_proxy_agent-*.whl

# ---------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS runtime

ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/kube-proxy-agent/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# iptables ships both back ends (xtables-nft-multi and xtables-legacy-multi)
# and registers iptables/ip6tables alternatives for each; the check below
# fails the build if either is missing.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        bpfcc-tools \
        ca-certificates \
        conntrack \
        iproute2 \
        ipset \
        iptables \
        ipvsadm \
        kmod \
        nftables \
        python3 \
        python3-bpfcc \
        python3-nftables \
        xz-utils \
 && rm -rf /var/lib/apt/lists/* \
 && for t in iptables ip6tables; do \
        update-alternatives --list "$t" | grep -q -- "${t}-nft\$" \
     && update-alternatives --list "$t" | grep -q -- "${t}-legacy\$" \
     || { echo "missing ${t}-nft or ${t}-legacy alternative" >&2; exit 1; }; \
    done \
 && python3 -c 'import nftables, bcc'

COPY --from=builder /opt/kube-proxy-agent /opt/kube-proxy-agent
# Smoke test in the stage that has the Debian-packaged bindings.
RUN kube-proxy-agent --help >/dev/null

LABEL org.opencontainers.image.title="kube-proxy-agent" \
      org.opencontainers.image.description="Node agent replacing kube-proxy (iptables, nftables, ipvs, ebpf modes)"

# 10249: Prometheus metrics (bind address from the config), 10256: /healthz and /livez.
EXPOSE 10249 10256

ENTRYPOINT ["/opt/kube-proxy-agent/bin/kube-proxy-agent"]
