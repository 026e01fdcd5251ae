// Command kwok-default-stages prints kwok's own default lifecycle stages as one YAML stream: nodes
// become Ready and renew their leases, pods become Ready, pods owned by Jobs complete, deleted pods go.
// kwok v0.8 applies no stages unless configured; kwokctl configures exactly these.
package main

import (
	"fmt"
	"strings"

	nodefast "sigs.k8s.io/kwok/kustomize/stage/node/fast"
	nodeheartbeatwithlease "sigs.k8s.io/kwok/kustomize/stage/node/heartbeat-with-lease"
	podfast "sigs.k8s.io/kwok/kustomize/stage/pod/fast"
)

func main() {
	stages := []string{
		nodefast.DefaultNodeInit,
		nodeheartbeatwithlease.DefaultNodeHeartbeatWithLease,
		podfast.DefaultPodReady,
		podfast.DefaultPodComplete,
		podfast.DefaultPodDelete,
	}
	for i, stage := range stages {
		stages[i] = strings.TrimSpace(stage)
	}
	fmt.Println(strings.Join(stages, "\n---\n"))
}
