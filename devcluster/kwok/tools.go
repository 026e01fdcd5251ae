//go:build tools

// Package tools pins kwok in a module of its own: it tracks newer client libraries than the
// pinned Kubernetes release, and only talks to the apiserver over its API.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
