# Test control plane (kube-apiserver, kube-controller-manager, kube-proxy, etcd)
# built from the Go module proxy and cached under
# $KPA_CACHE (default ~/.cache/kube-proxy-agent)/k8s/<version>/bin.
# Included by the top-level Makefile.

# Resolved relative to this file so it works whatever the including dir is.
CLUSTER_DIR := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))../tests/cluster)

.PHONY: cluster-bins
cluster-bins: ## Build (or reuse cached) kube-apiserver, kube-controller-manager, kube-proxy, etcd
	@$(CLUSTER_DIR)/build.sh
