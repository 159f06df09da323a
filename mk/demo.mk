# `make demo`: a real control plane (etcd, kube-apiserver, kube-controller-manager), two simulated
# nodes (network namespaces) running kube-proxy-agent in $(PROXY_MODE) mode, three pods and a
# Service, a few connections, the programmed rules and the agent's metrics; then everything is torn
# down. Needs root. Included by the top-level Makefile.
#
#   make demo                      # iptables
#   PROXY_MODE=nftables make demo

PROXY_MODE ?= iptables
DEMO_VENV := $(or $(VENV),.venv)

.PHONY: demo
demo: ## Real control plane + two simulated nodes running the agent ($(PROXY_MODE)), then tear down
	@$(MAKE) --no-print-directory install
	@$(MAKE) --no-print-directory cluster-bins
	PROXY_MODE=$(PROXY_MODE) $(DEMO_VENV)/bin/python -m tests.cluster.demo
