//go:build tools

// Package tools pins the Kubernetes control-plane and etcd main packages so
// that go.mod/go.sum track them. tests/cluster/build.sh builds them.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
