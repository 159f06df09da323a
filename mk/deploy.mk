# Local clusters running kube-proxy-agent instead of kube-proxy (kind, k3d),
# and the agent's container image. Included by the top-level Makefile.
#
#   make image                       docker build -t $(KPA_IMAGE) .
#   make kind-up   [PROXY_MODE=...]  kind cluster "kpa" (1 control plane, 2 workers) + the agent
#   make kind-check                  smoke test: ClusterIP, DNS, NodePort, metrics
#   make kind-logs                   dump nodes, pods, agent logs and events
#   make kind-down                   delete the kind cluster
#   make k3d-up / k3d-check / k3d-logs / k3d-down   the same on a single-node k3d cluster
#
# Needs docker (a running engine), kubectl, and kind or k3d.

# Resolved relative to this file so it works whatever the including dir is.
KPA_DEPLOY_DIR := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))../deploy)
KPA_SRC_DIR := $(abspath $(KPA_DEPLOY_DIR)/..)
PROXY_MODE ?= iptables
KPA_IMAGE ?= kube-proxy-agent:dev
KIND_CLUSTER_NAME ?= kpa
K3D_CLUSTER_NAME ?= kpa

# Passed to the scripts per recipe (not exported, so other targets are unaffected).
KPA_DEPLOY_ENV = PROXY_MODE=$(PROXY_MODE) KPA_IMAGE=$(KPA_IMAGE) \
	KIND_CLUSTER_NAME=$(KIND_CLUSTER_NAME) K3D_CLUSTER_NAME=$(K3D_CLUSTER_NAME)

.PHONY: image kind-up kind-down kind-check kind-logs k3d-up k3d-down k3d-check k3d-logs

image: ## Build the agent image ($(KPA_IMAGE)) with docker
	docker build -t $(KPA_IMAGE) $(KPA_SRC_DIR)

kind-up: ## kind cluster without kube-proxy, running the agent in $(PROXY_MODE) mode
	$(KPA_DEPLOY_ENV) $(KPA_DEPLOY_DIR)/kind/up.sh

kind-down: ## Delete the kind cluster
	$(KPA_DEPLOY_ENV) $(KPA_DEPLOY_DIR)/kind/down.sh

kind-check: ## Smoke-test Services on the kind cluster (deploy/check.sh)
	$(KPA_DEPLOY_ENV) $(KPA_DEPLOY_DIR)/check.sh kind-$(KIND_CLUSTER_NAME)

kind-logs: ## Dump nodes, pods, agent logs and events of the kind cluster
	$(KPA_DEPLOY_ENV) $(KPA_DEPLOY_DIR)/logs.sh kind-$(KIND_CLUSTER_NAME)

k3d-up: ## k3d cluster without kube-proxy (flannel on), running the agent in $(PROXY_MODE) mode
	$(KPA_DEPLOY_ENV) $(KPA_DEPLOY_DIR)/k3d/up.sh

k3d-down: ## Delete the k3d cluster
	$(KPA_DEPLOY_ENV) $(KPA_DEPLOY_DIR)/k3d/down.sh

k3d-check: ## Smoke-test Services on the k3d cluster (deploy/check.sh)
	$(KPA_DEPLOY_ENV) $(KPA_DEPLOY_DIR)/check.sh k3d-$(K3D_CLUSTER_NAME)

k3d-logs: ## Dump nodes, pods, agent logs and events of the k3d cluster
	$(KPA_DEPLOY_ENV) $(KPA_DEPLOY_DIR)/logs.sh k3d-$(K3D_CLUSTER_NAME)
