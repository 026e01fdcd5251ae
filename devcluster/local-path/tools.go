//go:build tools

// Package tools pins k3s's local-path provisioner in a module of its own: it tracks other client libraries
// than the pinned Kubernetes release, and only talks to the apiserver over its API.
package tools

import _ "github.com/rancher/local-path-provisioner"
