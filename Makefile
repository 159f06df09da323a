# kube-proxy-agent: `make demo` sets up and runs the demo; `make test` runs every test.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := iptables nftables python3-nftables conntrack ipset iproute2 kmod python3-venv \
	python3-pip openssl procps ipvsadm user-mode-linux gcc python3-bpfcc linux-headers-amd64
PROXY_MODE ?= iptables

.PHONY: install test unit kernel lint typecheck bench bench-compare demo clean
.DEFAULT_GOAL := help

help:
	@echo "make install   apt packages + venv (.venv) with the agent and its dev tools"
	@echo "make test      lint, type-check and every test (unit, kernel, end-to-end)"
	@echo "make demo      two simulated nodes on a real control plane, PROXY_MODE=$(PROXY_MODE)"
	@echo "make bench     1k/10k Services benchmark (not part of make test)"
	@echo "make bench-compare  kube-proxy vs the agent on the real control plane (COMPARE_ARGS=--sizes 1000,10000)"

$(VENV)/.installed: pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	fi
	@# the IPVS kernel tests boot a user-mode-linux guest, whose modprobe looks in /lib/modules
	@v=$$(ls /usr/lib/uml/modules 2>/dev/null | tail -1); if [ -n "$$v" ] && [ ! -e /lib/modules/$$v ]; then \
	  mkdir -p /lib/modules && ln -s /usr/lib/uml/modules/$$v /lib/modules/$$v; fi
	@# bcc (the eBPF mode) compiles against /lib/modules/$$(uname -r)/build: Debian's headers serve
	@# (only UAPI structs are used) when the running kernel has none of its own
	@k=$$(uname -r); h=$$(ls -d /usr/src/linux-headers-*[0-9]-amd64 2>/dev/null | sort -V | tail -1); \
	if [ -n "$$h" ] && [ ! -e /lib/modules/$$k/build ]; then \
	  mkdir -p /lib/modules/$$k && ln -s $$h /lib/modules/$$k/build && ln -s $${h%-amd64}-common /lib/modules/$$k/source; fi
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check agent tests
	$(VENV)/bin/lint-imports

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(VENV)/bin/pytest -q tests/unit

kernel: install
	$(VENV)/bin/pytest -q tests/kernel

test: lint typecheck
	@# the e2e tests' control plane: built (10-17 min cold, then cached) before pytest, whose
	@# per-test timeout it would exceed; a failed build is reported by the e2e tests themselves
	@tests/cluster/build.sh >/dev/null || echo "tests/cluster/build.sh failed: the e2e tests will say why"
	$(VENV)/bin/pytest -q -rfEs tests

bench: install
	$(PY) -m tests.bench.bench $(BENCH_ARGS)

# upstream kube-proxy and the agent side by side on the real control plane (tests/bench/compare.py)
bench-compare: install cluster-bins
	$(PY) -m tests.bench.compare $(COMPARE_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

-include mk/*.mk
